//! The CP's endpoints as a table: [`ROUTES`] is the only list the router
//! (`routes::handle`) matches requests against, so `tests/it/openapi.rs`
//! can check it against docs/openapi.yaml in both directions and a route
//! cannot exist without the document knowing.

/// What a request is for: one variant per row of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    WebOverview,
    WebRollout,
    WebHost,
    Healthz,
    Metrics,
    OpenApi,
    Publish,
    Dispatch,
    Events,
    Heartbeat,
    Status,
    Rollouts,
    Hosts,
    Rollout,
    RolloutEvents,
    Manifest,
    Resume,
    Cancel,
    Unquarantine,
    Actions,
    Plan,
}

/// One endpoint: method, path template (`{name}` matches one non-empty
/// segment, as in docs/openapi.yaml) and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub endpoint: Endpoint,
}

const fn route(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route { method, path, endpoint }
}

/// Every endpoint of the CP. `routes::handle` routes through this table only, so
/// it is the API's list of endpoints: `tests/it/openapi.rs` checks it
/// against docs/openapi.yaml in both directions.
pub const ROUTES: &[Route] = &[
    route("GET", "/", Endpoint::WebOverview),
    route("GET", "/rollouts/{rollout_id}", Endpoint::WebRollout),
    route("GET", "/hosts/{hostname}", Endpoint::WebHost),
    route("GET", "/healthz", Endpoint::Healthz),
    route("GET", "/metrics", Endpoint::Metrics),
    route("GET", "/v1/openapi.json", Endpoint::OpenApi),
    route("POST", "/v1/rollouts", Endpoint::Publish),
    route("GET", "/v1/agent/dispatch", Endpoint::Dispatch),
    route("POST", "/v1/agent/events", Endpoint::Events),
    route("POST", "/v1/agent/heartbeat", Endpoint::Heartbeat),
    route("GET", "/v1/status", Endpoint::Status),
    route("GET", "/v1/rollouts", Endpoint::Rollouts),
    route("GET", "/v1/hosts", Endpoint::Hosts),
    route("GET", "/v1/rollouts/{rollout_id}", Endpoint::Rollout),
    route("GET", "/v1/rollouts/{rollout_id}/events", Endpoint::RolloutEvents),
    route("GET", "/v1/rollouts/{rollout_id}/manifest", Endpoint::Manifest),
    route("POST", "/v1/rollouts/{rollout_id}/resume", Endpoint::Resume),
    route("POST", "/v1/rollouts/{rollout_id}/cancel", Endpoint::Cancel),
    route("POST", "/v1/channels/{channel}/unquarantine", Endpoint::Unquarantine),
    route("GET", "/v1/actions", Endpoint::Actions),
    route("POST", "/v1/plan", Endpoint::Plan),
];

/// Where a request goes: the endpoint and its path parameters in order, or
/// `Err(true)` when the path exists with other methods (405), `Err(false)`
/// when it does not (404).
pub fn find_route<'p>(method: &str, path: &'p str) -> Result<(Endpoint, Vec<&'p str>), bool> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut path_exists = false;
    for route in ROUTES {
        let template: Vec<&str> = route.path.trim_matches('/').split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let matched = template.iter().zip(&segments).all(|(t, s)| {
            if t.starts_with('{') {
                params.push(*s);
                !s.is_empty()
            } else {
                t == s
            }
        });
        if !matched {
            continue;
        }
        if route.method == method {
            return Ok((route.endpoint, params));
        }
        path_exists = true;
    }
    Err(path_exists)
}
