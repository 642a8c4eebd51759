/** Vite build of the headvis frontend: relative asset paths (static hosting anywhere) and a dev proxy.
 *
 * `npm run dev` proxies /data and /api to a running `python -m headvis.serve`
 * (HEADVIS_SERVER, default http://127.0.0.1:8765), so the page, its data and the
 * endpoints share one origin as they do when the server serves dist/ itself.
 */
import { svelte } from '@sveltejs/vite-plugin-svelte';
import { defineConfig } from 'vitest/config';

const server = process.env.HEADVIS_SERVER ?? 'http://127.0.0.1:8765';
const proxy = { target: server, changeOrigin: true }; // changeOrigin: the server checks the Host header

export default defineConfig({
  base: './',
  plugins: [svelte()],
  server: { proxy: { '/data': proxy, '/api': proxy } },
  build: { target: 'es2022', reportCompressedSize: false },
  test: { include: ['src/**/*.test.ts'], environment: 'node' },
});
