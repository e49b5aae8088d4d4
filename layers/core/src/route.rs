//! The cost table (docs/contract.md §2): which routes exist, what each costs, and where it goes upstream.
//!
//! Templates are paths whose segments are literals or parameters: `:id` is the model id (a
//! UUID in canonical form) and any other `:name` is a decimal integer. A request matches a
//! route only if every segment matches, so ids carrying `..`, encoded slashes or anything else
//! unexpected match nothing and never reach the inner service.

use std::fmt;
use std::sync::Arc;

use http::Method;

use crate::ids::ModelId;

/// The model id parameter of a template.
pub const MODEL_PARAM: &str = "id";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Model,
    Number(String),
}

fn parse_template(template: &str) -> Vec<Segment> {
    assert!(
        template.starts_with('/'),
        "route template {template:?} must start with '/'"
    );
    template[1..]
        .split('/')
        .map(|s| match s.strip_prefix(':') {
            Some(MODEL_PARAM) => Segment::Model,
            Some(name) => {
                assert!(!name.is_empty(), "empty parameter name in {template:?}");
                Segment::Number(name.to_owned())
            }
            None => Segment::Literal(s.to_owned()),
        })
        .collect()
}

/// Where a route goes upstream: a method and a path template relative to the upstream's API
/// base (`chats/:chat_id/messages`), with optional fixed query parameters (`type=active`)
/// that come before the client's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    method: Method,
    path: String,
    fixed_query: Option<String>,
}

impl UpstreamTarget {
    /// `path` may contain `?fixed=query`.
    pub fn new(method: Method, path: &str) -> Self {
        let (path, fixed_query) = match path.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path.to_owned(), None),
        };
        UpstreamTarget {
            method,
            path,
            fixed_query,
        }
    }

    /// The upstream method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The upstream path template (relative, no leading `/`).
    pub fn path_template(&self) -> &str {
        &self.path
    }

    /// The fixed query parameters, if any.
    pub fn fixed_query(&self) -> Option<&str> {
        self.fixed_query.as_deref()
    }
}

/// What a match captured: the model id and the numeric parameters (segment index, value).
type Captures = (Option<ModelId>, Vec<(usize, u64)>);

/// One priced route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    method: Method,
    template: String,
    cost: u64,
    segments: Vec<Segment>,
    upstream: Option<UpstreamTarget>,
}

impl RouteSpec {
    /// A route of `cost` credits.
    ///
    /// # Panics
    /// If `template` does not start with `/` or has an empty `:` parameter name.
    pub fn new(method: Method, template: &str, cost: u64) -> Self {
        RouteSpec {
            segments: parse_template(template),
            method,
            template: template.to_owned(),
            cost,
            upstream: None,
        }
    }

    /// Sets where the route is forwarded upstream.
    pub fn with_upstream(mut self, method: Method, path: &str) -> Self {
        self.upstream = Some(UpstreamTarget::new(method, path));
        self
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The template, e.g. `/api/models/:id/users/me` (this is what logs record as `route`).
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Credits charged for a 2xx response.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The upstream target, if the route is proxied.
    pub fn upstream(&self) -> Option<&UpstreamTarget> {
        self.upstream.as_ref()
    }

    /// Whether the route is about one model (has an `:id` segment).
    pub fn has_model(&self) -> bool {
        self.segments.contains(&Segment::Model)
    }

    fn matches(&self, method: &Method, path: &str) -> Option<Captures> {
        if method != self.method {
            return None;
        }
        let rest = path.strip_prefix('/')?;
        let mut model = None;
        let mut params = Vec::new();
        let mut parts = rest.split('/');
        for (i, seg) in self.segments.iter().enumerate() {
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) => {
                    if part != lit {
                        return None;
                    }
                }
                Segment::Model => model = Some(part.parse::<ModelId>().ok()?),
                Segment::Number(_) => {
                    if part.is_empty()
                        || part.len() > 20
                        || !part.bytes().all(|b| b.is_ascii_digit())
                    {
                        return None;
                    }
                    params.push((i, part.parse::<u64>().ok()?));
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((model, params))
    }
}

/// The routes a stack knows, with their costs. Cheap to clone (shared).
#[derive(Clone)]
pub struct CostTable {
    routes: Arc<[Arc<RouteSpec>]>,
}

impl CostTable {
    /// A table of the given routes; earlier routes win when several match.
    pub fn new(routes: impl IntoIterator<Item = RouteSpec>) -> Self {
        CostTable {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// The customer API of docs/contract.md §2: the OnlyFans endpoints and `/api/logs`,
    /// `/api/credits`, `/api/usage`.
    pub fn onlyfans() -> Self {
        use Method as M;
        let m = "/api/models/:id";
        CostTable::new([
            RouteSpec::new(M::GET, &format!("{m}/users/me"), 1).with_upstream(M::GET, "users/me"),
            RouteSpec::new(M::GET, &format!("{m}/chats"), 1).with_upstream(M::GET, "chats"),
            RouteSpec::new(M::GET, &format!("{m}/chats/:chat_id/messages"), 1)
                .with_upstream(M::GET, "chats/:chat_id/messages"),
            RouteSpec::new(M::POST, &format!("{m}/chats/:user_id/messages"), 2)
                .with_upstream(M::POST, "chats/:user_id/messages"),
            RouteSpec::new(M::DELETE, &format!("{m}/messages/:message_id"), 1)
                .with_upstream(M::DELETE, "messages/:message_id"),
            RouteSpec::new(M::GET, &format!("{m}/fans/info"), 1)
                .with_upstream(M::GET, "subscriptions/subscribers?type=active"),
            RouteSpec::new(M::GET, &format!("{m}/payouts/balances"), 1)
                .with_upstream(M::GET, "payouts/balances"),
            RouteSpec::new(M::GET, &format!("{m}/payouts/requests"), 1)
                .with_upstream(M::GET, "payouts/requests"),
            RouteSpec::new(M::GET, &format!("{m}/payouts/requests/referral"), 1)
                .with_upstream(M::GET, "payouts/requests/referral"),
            RouteSpec::new(M::GET, &format!("{m}/payouts/transactions"), 1)
                .with_upstream(M::GET, "payouts/transactions"),
            RouteSpec::new(M::GET, &format!("{m}/payouts/stats"), 2)
                .with_upstream(M::GET, "payouts/stats"),
            RouteSpec::new(M::GET, "/api/logs", 0),
            RouteSpec::new(M::GET, "/api/credits", 0),
            RouteSpec::new(M::GET, "/api/usage", 0),
        ])
    }

    /// The routes, in order.
    pub fn routes(&self) -> impl Iterator<Item = &RouteSpec> {
        self.routes.iter().map(|r| &**r)
    }

    /// The route a request goes to, if any. `path` is the path as received (no query).
    pub fn lookup(&self, method: &Method, path: &str) -> Option<RouteMatch> {
        self.routes.iter().find_map(|route| {
            route
                .matches(method, path)
                .map(|(model, params)| RouteMatch {
                    route: Arc::clone(route),
                    model,
                    params,
                })
        })
    }

    /// The route for a request, reusing a [`RouteMatch`] an outer layer already put in the
    /// request extensions, else looking it up (and storing it for the layers inside).
    pub fn resolve<B>(&self, req: &mut http::Request<B>) -> Option<RouteMatch> {
        if let Some(m) = req.extensions().get::<RouteMatch>() {
            return Some(m.clone());
        }
        let m = self.lookup(req.method(), req.uri().path())?;
        req.extensions_mut().insert(m.clone());
        Some(m)
    }
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable::onlyfans()
    }
}

impl fmt::Debug for CostTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.routes
                    .iter()
                    .map(|r| (r.method.as_str(), &r.template, r.cost)),
            )
            .finish()
    }
}

/// A request matched to a route: its spec, the model id and the numeric parameters. Carried
/// in request extensions (and copied to the response for the logger).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    route: Arc<RouteSpec>,
    model: Option<ModelId>,
    params: Vec<(usize, u64)>,
}

impl RouteMatch {
    /// The route.
    pub fn route(&self) -> &RouteSpec {
        &self.route
    }

    /// The route's template.
    pub fn template(&self) -> &str {
        &self.route.template
    }

    /// The route's cost.
    pub fn cost(&self) -> u64 {
        self.route.cost
    }

    /// The model the request is about, if the route has one.
    pub fn model(&self) -> Option<ModelId> {
        self.model
    }

    /// A numeric parameter by name (`chat_id`, `user_id`, `message_id`).
    pub fn param(&self, name: &str) -> Option<u64> {
        self.params
            .iter()
            .find_map(|&(i, v)| match &self.route.segments[i] {
                Segment::Number(n) if n == name => Some(v),
                _ => None,
            })
    }

    /// The upstream path and query, relative to the upstream API base: the target template
    /// with parameters filled in, then the fixed query, then the client's raw query byte for
    /// byte. `None` when the route is not proxied.
    pub fn upstream_path_and_query(&self, client_query: Option<&str>) -> Option<String> {
        let target = self.route.upstream.as_ref()?;
        let mut out = String::with_capacity(target.path.len() + 32);
        for (i, part) in target.path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            match part.strip_prefix(':') {
                Some(name) => out.push_str(&self.param(name)?.to_string()),
                None => out.push_str(part),
            }
        }
        let client_query = client_query.filter(|q| !q.is_empty());
        match (target.fixed_query.as_deref(), client_query) {
            (Some(f), Some(c)) => {
                out.push('?');
                out.push_str(f);
                out.push('&');
                out.push_str(c);
            }
            (Some(q), None) | (None, Some(q)) => {
                out.push('?');
                out.push_str(q);
            }
            (None, None) => {}
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10";

    fn path(rest: &str) -> String {
        format!("/api/models/{MODEL}{rest}")
    }

    #[test]
    fn numeric_parameters_take_every_u64_and_nothing_larger() {
        // Found by the route_match fuzz target: u64::MAX has 20 digits and was refused.
        let t = CostTable::onlyfans();
        let max = t
            .lookup(&Method::GET, &path("/chats/18446744073709551615/messages"))
            .expect("u64::MAX is a chat id");
        assert_eq!(max.param("chat_id"), Some(u64::MAX));
        for too_big in ["18446744073709551616", "000000000000000000001"] {
            let p = path(&format!("/chats/{too_big}/messages"));
            assert!(t.lookup(&Method::GET, &p).is_none(), "{too_big}");
        }
        let zeros = t
            .lookup(&Method::GET, &path("/chats/00000000000000000042/messages"))
            .expect("leading zeros within 20 digits");
        assert_eq!(zeros.param("chat_id"), Some(42));
    }

    #[test]
    fn every_contract_route_with_cost_and_upstream() {
        let t = CostTable::onlyfans();
        let cases = [
            (Method::GET, path("/users/me"), 1, Some("users/me")),
            (Method::GET, path("/chats"), 1, Some("chats")),
            (
                Method::GET,
                path("/chats/42/messages"),
                1,
                Some("chats/42/messages"),
            ),
            (
                Method::POST,
                path("/chats/7/messages"),
                2,
                Some("chats/7/messages"),
            ),
            (Method::DELETE, path("/messages/99"), 1, Some("messages/99")),
            (
                Method::GET,
                path("/fans/info"),
                1,
                Some("subscriptions/subscribers?type=active"),
            ),
            (
                Method::GET,
                path("/payouts/balances"),
                1,
                Some("payouts/balances"),
            ),
            (
                Method::GET,
                path("/payouts/requests"),
                1,
                Some("payouts/requests"),
            ),
            (
                Method::GET,
                path("/payouts/requests/referral"),
                1,
                Some("payouts/requests/referral"),
            ),
            (
                Method::GET,
                path("/payouts/transactions"),
                1,
                Some("payouts/transactions"),
            ),
            (
                Method::GET,
                path("/payouts/stats"),
                2,
                Some("payouts/stats"),
            ),
            (Method::GET, "/api/logs".to_owned(), 0, None),
            (Method::GET, "/api/credits".to_owned(), 0, None),
        ];
        for (method, p, cost, upstream) in cases {
            let m = t
                .lookup(&method, &p)
                .unwrap_or_else(|| panic!("{method} {p}"));
            assert_eq!(m.cost(), cost, "{p}");
            assert_eq!(m.upstream_path_and_query(None).as_deref(), upstream, "{p}");
            if p.starts_with("/api/models/") {
                assert_eq!(m.model().unwrap().to_string(), MODEL);
            } else {
                assert_eq!(m.model(), None);
            }
        }
    }

    #[test]
    fn bad_ids_and_methods_match_nothing() {
        let t = CostTable::onlyfans();
        for p in [
            path("/chats/abc/messages"),
            path("/chats/-1/messages"),
            path("/chats/1.5/messages"),
            path("/chats/%2e%2e/messages"),
            path("/chats/99999999999999999999/messages"),
            path("/users/me/"),
            path("//users/me"),
            "/api/models/..%2f/users/me".to_owned(),
            "/api/models/not-a-uuid/users/me".to_owned(),
            "/api/models/%7B0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10%7D/users/me".to_owned(),
            "/api/models".to_owned(),
            "/".to_owned(),
            "".to_owned(),
        ] {
            assert!(t.lookup(&Method::GET, &p).is_none(), "{p}");
        }
        assert!(t.lookup(&Method::PUT, &path("/users/me")).is_none());
        assert!(t
            .lookup(&Method::DELETE, &path("/chats/1/messages"))
            .is_none());
    }

    #[test]
    fn queries_pass_through_after_fixed_ones() {
        let t = CostTable::onlyfans();
        let fans = t.lookup(&Method::GET, &path("/fans/info")).unwrap();
        assert_eq!(
            fans.upstream_path_and_query(Some("limit=10&offset=%20x"))
                .unwrap(),
            "subscriptions/subscribers?type=active&limit=10&offset=%20x"
        );
        let chats = t.lookup(&Method::GET, &path("/chats/5/messages")).unwrap();
        assert_eq!(chats.param("chat_id"), Some(5));
        assert_eq!(
            chats
                .upstream_path_and_query(Some("id=1&order=desc"))
                .unwrap(),
            "chats/5/messages?id=1&order=desc"
        );
        assert_eq!(
            chats.upstream_path_and_query(Some("")).unwrap(),
            "chats/5/messages"
        );
    }

    #[test]
    fn resolve_reuses_an_outer_match() {
        let t = CostTable::onlyfans();
        let mut req = http::Request::get(path("/payouts/stats")).body(()).unwrap();
        let first = t.resolve(&mut req).unwrap();
        let custom = CostTable::new([RouteSpec::new(Method::GET, "/other", 9)]);
        // A layer with another table still sees the outer layer's decision.
        assert_eq!(custom.resolve(&mut req), Some(first));
    }
}
