//! Route matching of the cost table: any (method, path) matches at most a route whose
//! template renders back to the path, and every path rendered from a template matches that
//! template with the same captures.
#![no_main]

use http::Method;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tollgate::core::{CostTable, ModelId, RouteMatch};

#[derive(Debug, Arbitrary)]
enum Input {
    /// A request as a client could send it.
    Raw {
        method: u8,
        path: String,
        query: Option<String>,
    },
    /// A path made from one of the table's templates.
    FromTemplate {
        route: u8,
        model: [u8; 16],
        numbers: [u64; 2],
        query: Option<String>,
    },
}

const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::DELETE,
    Method::PUT,
    Method::HEAD,
];

/// The match's template with its captures filled in, segment by segment, checked against
/// the path it matched.
fn check_renders_back(m: &RouteMatch, path: &str) {
    let template: Vec<&str> = m.template().split('/').collect();
    let given: Vec<&str> = path.split('/').collect();
    assert_eq!(template.len(), given.len(), "{path} vs {}", m.template());
    for (t, g) in template.iter().zip(&given) {
        match t.strip_prefix(':') {
            Some("id") => {
                let model = m.model().expect("a model route captures its model");
                assert_eq!(g.parse::<ModelId>().ok(), Some(model), "{path}");
            }
            Some(name) => {
                let value = m.param(name).expect("a numeric parameter is captured");
                assert!(g.bytes().all(|b| b.is_ascii_digit()), "{path}");
                assert_eq!(g.parse::<u64>().ok(), Some(value), "{path}");
            }
            None => assert_eq!(t, g, "{path}"),
        }
    }
}

fn check_upstream(m: &RouteMatch, query: Option<&str>) {
    let Some(target) = m.route().upstream() else {
        assert_eq!(m.upstream_path_and_query(query), None);
        return;
    };
    let upstream = m
        .upstream_path_and_query(query)
        .expect("a proxied route always has an upstream path");
    let path = upstream.split('?').next().unwrap_or_default();
    // Only digits replace parameters: nothing can climb out of the upstream API base.
    assert!(!path.starts_with('/') && !path.contains("//") && !path.contains(".."));
    assert_eq!(
        path.split('/').count(),
        target.path_template().split('/').count(),
        "{upstream}"
    );
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        assert!(upstream.ends_with(q), "the client's query passes byte for byte");
    }
}

fuzz_target!(|input: Input| {
    let table = CostTable::onlyfans();
    match input {
        Input::Raw {
            method,
            path,
            query,
        } => {
            let method = &METHODS[usize::from(method) % METHODS.len()];
            let Some(m) = table.lookup(method, &path) else {
                return;
            };
            assert_eq!(m.route().method(), method);
            assert!(table.routes().any(|r| r.template() == m.template()));
            check_renders_back(&m, &path);
            check_upstream(&m, query.as_deref());
        }
        Input::FromTemplate {
            route,
            model,
            numbers,
            query,
        } => {
            let routes: Vec<_> = table.routes().collect();
            let spec = routes[usize::from(route) % routes.len()];
            let model = ModelId::from_uuid(uuid::Uuid::from_bytes(model));
            let mut n = numbers.iter();
            let path = spec
                .template()
                .split('/')
                .map(|seg| match seg.strip_prefix(':') {
                    Some("id") => model.to_string(),
                    Some(_) => n.next().copied().unwrap_or(0).to_string(),
                    None => seg.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("/");
            let m = table
                .lookup(spec.method(), &path)
                .unwrap_or_else(|| panic!("{path} does not match {}", spec.template()));
            assert_eq!(m.template(), spec.template());
            assert_eq!(m.cost(), spec.cost());
            if spec.has_model() {
                assert_eq!(m.model(), Some(model));
            }
            check_renders_back(&m, &path);
            check_upstream(&m, query.as_deref());
        }
    }
});
