//! The documentation matches the code: every route of the cost table and of the admin router
//! is in `docs/openapi.yaml` (with its price), every setting of the binary is in
//! `docs/configuration.md`, every error code is explained in `docs/` and listed in the
//! OpenAPI document, and the READMEs, `docs/` and the rustdoc link only to files in
//! the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde_json::Value;

use tollgate::core::{CostTable, ErrorCode};
use tollgate::gateway::cli::Cli;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn openapi() -> Value {
    serde_norway::from_str(&read("docs/openapi.yaml")).expect("docs/openapi.yaml is YAML")
}

/// `/api/models/:id/chats` → `/api/models/{id}/chats`.
fn openapi_path(template: &str) -> String {
    template
        .split('/')
        .map(|s| match s.strip_prefix(':') {
            Some(name) => format!("{{{name}}}"),
            None => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_priced_route_is_in_the_openapi_document_with_its_cost() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.1.0");
    for route in CostTable::onlyfans().routes() {
        let path = openapi_path(route.template());
        let method = route.method().as_str().to_ascii_lowercase();
        let op = &doc["paths"][&path][&method];
        assert!(
            op.is_object(),
            "{} {} is not in docs/openapi.yaml",
            route.method(),
            path
        );
        assert_eq!(
            op["x-tollgate-cost"].as_u64(),
            Some(route.cost()),
            "{} {path}: x-tollgate-cost",
            route.method()
        );
        assert!(
            op["responses"]["200"].is_object(),
            "{method} {path}: no 200"
        );
        assert!(
            op["responses"]["401"].is_object(),
            "{method} {path}: no 401"
        );
    }
}

/// The admin routes as the router matches them: each `(&Method::X, ["orgs", org, …])` arm of
/// `src/gateway/admin.rs` (string literals are fixed segments, names are parameters).
fn admin_routes() -> BTreeSet<(String, String)> {
    let source = read("src/gateway/admin.rs");
    let mut routes = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("(&Method::") {
        rest = &rest[at + "(&Method::".len()..];
        let Some((method, after)) = rest.split_once(',') else {
            break;
        };
        let after = after.trim_start();
        let Some(segments) = after.strip_prefix('[').and_then(|s| s.split_once(']')) else {
            continue;
        };
        let path: Vec<String> = segments
            .0
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(
                |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    Some(fixed) => fixed.to_owned(),
                    None => format!("{{{s}}}"),
                },
            )
            .collect();
        routes.insert((
            method.trim().to_ascii_lowercase(),
            format!("/admin/{}", path.join("/")),
        ));
    }
    routes
}

#[test]
fn every_admin_route_is_in_the_openapi_document() {
    let routes = admin_routes();
    // The contract's admin API (§5, §8) at least; the parse found them all.
    assert!(routes.len() >= 13, "{routes:?}");
    assert!(
        routes.contains(&("put".into(), "/admin/orgs/{org}/credits".into())),
        "{routes:?}"
    );
    let doc = openapi();
    for (method, path) in &routes {
        let op = &doc["paths"][path][method];
        assert!(
            op.is_object(),
            "{method} {path} is not in docs/openapi.yaml"
        );
        assert_eq!(
            op["security"][0]["adminToken"],
            Value::Array(vec![]),
            "{method} {path}"
        );
        assert!(
            op["responses"]["401"].is_object(),
            "{method} {path}: no 401"
        );
    }
    // And the document has no admin operation the router lacks.
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/admin") {
            continue;
        }
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
        {
            assert!(
                routes.contains(&(method.clone(), path.clone())),
                "docs/openapi.yaml has {method} {path}, the router does not"
            );
        }
    }
}

#[test]
fn every_setting_of_the_binary_is_documented() {
    let docs = read("docs/configuration.md");
    let readme = read("README.md");
    let cmd = Cli::command();
    let mut count = 0;
    for arg in cmd.get_arguments() {
        let Some(var) = arg.get_env().and_then(|v| v.to_str()) else {
            continue;
        };
        count += 1;
        let long = arg.get_long().expect("every setting has a flag");
        assert!(
            docs.contains(&format!("| `{var}` | `--{long}` |")),
            "{var} / --{long} is not in the table of docs/configuration.md"
        );
        assert!(
            readme.contains(&format!("`{}", var.trim_end_matches("_FILE"))),
            "{var} is not in the README"
        );
    }
    assert!(count >= 26, "{count} settings");
}

#[test]
fn every_error_code_is_explained_and_in_the_openapi_document() {
    let customer = read("docs/customer-api.md");
    let admin = read("docs/admin-api.md");
    let doc = openapi();
    let listed: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("an ErrorCode enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for code in ErrorCode::ALL {
        let code = code.as_str();
        // A heading of its own in the customer API, or a row of the admin API's table.
        assert!(
            customer.contains(&format!("— `{code}`")) || admin.contains(&format!("| `{code}` |")),
            "{code} is not explained in docs/customer-api.md or docs/admin-api.md"
        );
        assert!(
            listed.contains(&code),
            "{code} is not in the ErrorCode schema"
        );
    }
    assert_eq!(listed.len(), ErrorCode::ALL.len(), "{listed:?}");
}

/// Markdown links `[text](target)` of `text`.
fn markdown_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            links.push(rest[..end].to_owned());
        }
    }
    links
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    for dir in ["docs", "layers"] {
        for entry in walk(&root().join(dir)) {
            if entry.extension().is_some_and(|e| e == "md") {
                files.push(entry);
            }
        }
    }
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                out.extend(walk(&path));
            }
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn readmes_and_docs_link_only_to_files_in_the_repository() {
    let files = markdown_files();
    assert!(files.len() >= 10, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in markdown_links(&text) {
            let target = link.split('#').next().unwrap_or_default();
            assert!(
                !target.contains("://") && !target.starts_with("mailto:"),
                "{}: links outside the repository: {link}",
                file.display()
            );
            if target.is_empty() {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            assert!(resolved.exists(), "{}: broken link {link}", file.display());
        }
        for reference in ["SPEC.md", "shared project folder", "UPSTREAM.md"] {
            assert!(
                !text.contains(reference),
                "{}: mentions {reference}",
                file.display()
            );
        }
    }
}

#[test]
fn rustdoc_links_only_to_files_in_the_repository() {
    let mut sources = walk(&root().join("src"));
    sources.extend(
        walk(&root().join("layers"))
            .into_iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "src")),
    );
    let mut checked = 0;
    for file in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let doc = line.trim_start();
            if !(doc.starts_with("//!") || doc.starts_with("///")) {
                continue;
            }
            checked += 1;
            for link in markdown_links(doc) {
                assert!(
                    !link.contains("://"),
                    "{}:{}: a doc link outside the repository: {link}",
                    file.display(),
                    n + 1
                );
            }
            assert!(
                !doc.contains("<http://")
                    && !doc.contains("<https://")
                    && !doc.contains("SPEC §")
                    && !doc.contains("SPEC.md"),
                "{}:{}: refers outside the repository: {doc}",
                file.display(),
                n + 1
            );
        }
    }
    assert!(checked > 500, "{checked} doc lines");
}
