/** The current route as shared reactive state: `router.route` follows the URL, `router.go` changes both.
 *
 * Every change is a history entry (pushState), so back and forward walk
 * through views; popstate puts the route back from the URL.
 */

import { parseRoute, routeQuery, type Route } from './url';

export class Router {
  route = $state<Route>(parseRoute(location.search));

  constructor() {
    window.addEventListener('popstate', () => {
      this.route = parseRoute(location.search);
    });
  }

  /** The href of a route, relative to the page (the overview is the bare page). */
  href(route: Route): string {
    return routeQuery(route) || location.pathname;
  }

  /** Show `route`: a new history entry, or the current one replaced. Going where we are is a no-op. */
  go(route: Route, { replace = false } = {}): void {
    const query = routeQuery(route);
    if (query === routeQuery(this.route)) return;
    history[replace ? 'replaceState' : 'pushState'](null, '', query || location.pathname);
    this.route = route;
  }

  /** A link's click handler: plain left clicks navigate in place, modified ones open as the browser would. */
  follow(event: MouseEvent, route: Route): void {
    if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) {
      return;
    }
    event.preventDefault();
    this.go(route);
  }
}

export const router = new Router();
