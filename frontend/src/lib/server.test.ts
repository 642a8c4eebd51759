import { describe, expect, it } from 'vitest';
import { apiBase, ServerError } from './server';

describe('apiBase', () => {
  const page = (href: string) => new URL(href);

  it('is the advertised origin for a page from elsewhere', () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://example.org/headvis/'))).toBe('http://127.0.0.1:8765');
    expect(apiBase('http://127.0.0.1:8765/', page('http://127.0.0.1:9000/'))).toBe('http://127.0.0.1:8765');
  });
  it("is the page's origin when the page comes from the same server under another loopback name", () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://localhost:8765/?layer=1&head=0'))).toBe('http://localhost:8765');
    expect(apiBase('http://[::1]:8765', page('http://127.0.0.1:8765/'))).toBe('http://127.0.0.1:8765');
  });
  it("is the page's origin in development (the Vite proxy forwards /api)", () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://localhost:5173/'), true)).toBe('http://localhost:5173');
  });
  it('refuses a url that is not one', () => {
    expect(() => apiBase('not a url', page('http://localhost:8765/'))).toThrow(ServerError);
  });
});
