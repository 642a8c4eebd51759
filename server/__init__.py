"""The aiohttp server: static hosting of the frontend and data/, and the live endpoints."""
