//! The API document, docs/openapi.yaml: it lists exactly the routes of
//! `cp::routes::ROUTES` (the router's only table), its JSON twin
//! (docs/openapi.json, what `GET /v1/openapi.json` serves) is the same
//! document, and [`check_response`] validates every answer the integration
//! tests receive through `harness::request` against its schemas.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use hyper::StatusCode;
use nixfleet::client::HttpResponse;
use nixfleet::cp::route_table::{find_route, ROUTES};
use serde_json::Value;

use crate::harness::TempDir;

fn docs(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs").join(name)
}

/// YAML → JSON value; mapping keys become strings (`200:` is the key "200").
fn yaml_to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(s) => {
            s.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
        }
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) | Yaml::Real(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("docs/openapi.yaml: unsupported mapping key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("docs/openapi.yaml: unsupported YAML node {other:?}"),
    }
}

/// docs/openapi.yaml, parsed.
fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let text = std::fs::read_to_string(docs("openapi.yaml")).expect("read docs/openapi.yaml");
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("docs/openapi.yaml is YAML");
        assert_eq!(docs.len(), 1, "docs/openapi.yaml holds one document");
        yaml_to_json(&docs[0])
    })
}

/// `$ref: '#/components/...'` → the referenced value.
fn resolve(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => {
            let target = pointer.strip_prefix('#').unwrap_or_else(|| panic!("only local refs: {pointer}"));
            document().pointer(target).unwrap_or_else(|| panic!("dangling $ref {pointer}"))
        }
        None => value,
    }
}

/// A compiled validator per schema ref (`#/components/schemas/X`).
fn validate(schema_ref: &str, instance: &Value) -> Result<(), Vec<String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, jsonschema::Validator>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let validator = cache.entry(schema_ref.to_owned()).or_insert_with(|| {
        let root = serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": schema_ref,
            "components": document()["components"],
        });
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("schema {schema_ref} does not compile: {e}"))
    });
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("at {}: {e}", e.instance_path())).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks one answer against the document: the route (or, for an unknown
/// path, the error shape), its status and its content type are documented,
/// and a JSON body matches the schema. Panics naming what disagrees.
pub fn check_response(method: &str, path_and_query: &str, resp: &HttpResponse) {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let status = resp.status.as_str().to_owned();
    let media = resp
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
    let what = format!("{method} {path} answered {status}");
    let operation = match find_route(method, path) {
        Ok((endpoint, _)) => {
            let route = ROUTES.iter().find(|r| r.endpoint == endpoint).expect("endpoint in ROUTES");
            document()["paths"][route.path]
                .get(method.to_lowercase())
                .unwrap_or_else(|| panic!("{what}: docs/openapi.yaml has no operation {method} {}", route.path))
        }
        Err(_) => {
            // Unrouted: 404/405, always the JSON error shape.
            assert!(matches!(resp.status, StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED), "{what}");
            let body: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
            if let Err(errors) = validate("#/components/schemas/Error", &body) {
                panic!("{what}: the error body does not match the document:\n{}", errors.join("\n"));
            }
            return;
        }
    };
    let responses = &operation["responses"];
    let documented = responses.get(&status).or_else(|| responses.get("default"));
    let documented = resolve(documented.unwrap_or_else(|| panic!("{what}: status {status} is not documented")));
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        assert!(resp.body.is_empty(), "{what}: the document says no body, got {} bytes", resp.body.len());
        return;
    };
    let media = media.unwrap_or_else(|| panic!("{what}: no Content-Type"));
    let entry = content.get(&media).unwrap_or_else(|| panic!("{what}: Content-Type {media} is not documented"));
    if media != "application/json" {
        return;
    }
    let schema_ref = entry["schema"]["$ref"]
        .as_str()
        .or_else(|| entry["schema"]["items"]["$ref"].as_str())
        .unwrap_or_else(|| panic!("{what}: each JSON response schema is a $ref (or an array of one)"));
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
    let result = if entry["schema"].get("$ref").is_some() {
        validate(schema_ref, &body)
    } else {
        let items = body.as_array().unwrap_or_else(|| panic!("{what}: the document says an array: {body}"));
        items.iter().try_for_each(|item| validate(schema_ref, item))
    };
    if let Err(errors) = result {
        panic!("{what}: the body does not match {schema_ref}:\n{}\nbody: {body:#}", errors.join("\n"));
    }
}

/// A JSON document the CLI prints (`cp status --json`, `cp plan --json`,
/// each line of `cp status --watch --json`) against the document's schema
/// `name` (`#/components/schemas/{name}`). Panics naming what disagrees.
pub fn check_schema(what: &str, name: &str, value: &Value) {
    if let Err(errors) = validate(&format!("#/components/schemas/{name}"), value) {
        panic!("{what} does not match the schema {name}:\n{}\n{value:#}", errors.join("\n"));
    }
}

/// An answer to a path the document cannot list (no route, answered
/// before routing, e.g. 403 `role_required` under mutual TLS, or an answer
/// of the HTTP layer to a request it cannot parse): still the JSON error
/// shape of the document.
pub fn check_error_shape(what: &str, body: &Value) {
    if let Err(errors) = validate("#/components/schemas/Error", body) {
        panic!("{what}: the error body does not match the document:\n{}", errors.join("\n"));
    }
}

/// The router's table and the document list the same (method, path) pairs.
#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let routed: BTreeSet<(String, String)> =
        ROUTES.iter().map(|r| (r.method.to_lowercase(), r.path.to_owned())).collect();
    let mut documented = BTreeSet::new();
    for (path, item) in document()["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from docs/openapi.yaml: {undocumented:?}");
    assert!(unrouted.is_empty(), "docs/openapi.yaml lists routes the CP does not have: {unrouted:?}");
    assert_eq!(document()["openapi"], "3.1.0");
}

/// docs/openapi.json (served by the CP) is docs/openapi.yaml as JSON.
/// `NIXFLEET_BLESS=1` rewrites it from the YAML.
#[test]
fn the_json_twin_is_the_yaml_document() {
    let twin_path = docs("openapi.json");
    if std::env::var_os("NIXFLEET_BLESS").is_some() {
        let text = serde_json::to_string_pretty(document()).expect("json") + "\n";
        std::fs::write(&twin_path, text).expect("write docs/openapi.json");
    }
    let twin: Value =
        serde_json::from_slice(&std::fs::read(&twin_path).expect("read docs/openapi.json")).expect("json");
    assert!(
        &twin == document(),
        "docs/openapi.json differs from docs/openapi.yaml; run NIXFLEET_BLESS=1 cargo test --test it openapi"
    );
}

/// Every schema compiles, and the document's own checker catches a body
/// that does not match (so a passing check means something).
#[test]
fn schemas_compile_and_reject_wrong_bodies() {
    for name in document()["components"]["schemas"].as_object().expect("schemas").keys() {
        let _ = validate(&format!("#/components/schemas/{name}"), &Value::Null);
    }
    let good = serde_json::json!({"error": "x", "message": "y"});
    assert!(validate("#/components/schemas/Error", &good).is_ok());
    let extra = serde_json::json!({"error": "x", "message": "y", "stray": 1});
    assert!(validate("#/components/schemas/Error", &extra).is_err());
    let dispatch = serde_json::json!({
        "rollout_id": "stable@r1", "target_closure": crate::harness::closure("x"), "wave": 0, "soak_secs": 1,
        "issued_at": "2026-11-25T12:00:00Z",
    });
    assert!(validate("#/components/schemas/Dispatch", &dispatch).is_ok());
    let mut missing = dispatch.clone();
    missing.as_object_mut().unwrap().remove("wave");
    assert!(validate("#/components/schemas/Dispatch", &missing).is_err());
    let event = serde_json::json!({"seq": 1, "kind": "Converged", "converged_at": "2026-11-25T12:00:00Z",
        "current_closure": crate::harness::closure("x")});
    assert!(validate("#/components/schemas/OutboundEvent", &event).is_ok());
    let mut wrong_kind = event.clone();
    wrong_kind["kind"] = "Exploded".into();
    assert!(validate("#/components/schemas/OutboundEvent", &wrong_kind).is_err());
}

/// The CP serves the twin at `GET /v1/openapi.json`, and the answers of a
/// short session (publish, dispatch, events, heartbeat, every view, errors)
/// pass the document's checks through the harness.
#[test]
fn the_cp_serves_the_document() {
    let dir = TempDir::new("openapi");
    let release = crate::harness::Release::new(dir.path(), "release");
    let cp = crate::harness::Cp::start(dir.path(), &release.pub_path);
    crate::cp::rt().block_on(async {
        let served = cp.get_json("/v1/openapi.json").await;
        assert!(&served == document(), "served document differs from docs/openapi.yaml");
        let m = crate::harness::manifest(
            "docs@r1",
            "2026-11-25T12:00:00Z",
            0,
            &[("all", 0, 2)],
            &[("doc-1", 0, "doc-1-new"), ("doc-2", 0, "doc-2-new")],
        );
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        let mut agent = crate::harness::Agent::new("doc-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        agent.activate(&d).await;
        agent.heartbeat().await;
        for path in ["/v1/status", "/v1/hosts", "/v1/rollouts", "/v1/rollouts/docs@r1", "/v1/rollouts/docs@r1/events"] {
            cp.get_json(path).await;
        }
        assert_eq!(cp.get("/v1/rollouts/docs@r1/manifest").await.status, StatusCode::OK);
        assert_eq!(cp.get("/nowhere").await.status, StatusCode::NOT_FOUND);
        assert_eq!(cp.get("/v1/agent/events").await.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(cp.get("/v1/rollouts/not-an-id").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(cp.get("/healthz").await.status, StatusCode::OK);
    });
}
