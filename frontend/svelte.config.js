/** Svelte options: TypeScript in <script lang="ts"> through Vite's preprocessor. */
import { vitePreprocess } from '@sveltejs/vite-plugin-svelte';

export default { preprocess: vitePreprocess() };
