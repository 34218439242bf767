//! Watching the rollout through the CP's status API, as an operator would:
//! plain lines for every change when stdout is piped, a view redrawn in
//! place (per wave, per host, with the time in its state) on a terminal,
//! and the final per-host table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::Value;

use super::{setup, DemoError, Host, Say, ROLLOUT};
use crate::client::{request, CpUrl};
use crate::output::print_stdout;

/// The demo should finish within a minute; past this something is wrong.
const DEMO_LIMIT: Duration = Duration::from_secs(90);
/// How often the CP's status is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Live-view lines are cut to fit an 80-column terminal: a wrapped line
/// would throw off the count of lines the next redraw moves up over (the
/// final table prints the full halt reason).
const MAX_LIVE_LINE_CHARS: usize = 79;

/// What the watcher remembers between two looks.
#[derive(Debug)]
struct Seen {
    /// Host name → (state, when the demo first saw it).
    hosts: BTreeMap<String, (String, Instant)>,
    rollout: String,
    /// Lines of the live view drawn last (to redraw over them).
    drawn: usize,
}

/// Polls the rollout until it has halted and every host has settled;
/// returns the CP's last answer.
pub async fn watch(url: &CpUrl, say: &Say, live: bool) -> Result<Value, DemoError> {
    let mut seen = Seen { hosts: BTreeMap::new(), rollout: String::new(), drawn: 0 };
    loop {
        let resp =
            request(url, Method::GET, &format!("/v1/rollouts/{ROLLOUT}"), &[], None).await.map_err(setup("status"))?;
        let detail: Value = resp.json().map_err(setup("status"))?;
        let changes = seen.update(&detail);
        if live {
            seen.redraw(&detail, say);
        } else {
            for line in changes {
                say.line(&line);
            }
        }
        if settled(&detail) {
            return Ok(detail);
        }
        if say.elapsed() > DEMO_LIMIT {
            return Err(DemoError::Setup(format!("the rollout did not settle within {DEMO_LIMIT:?}: {detail}")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn hosts(detail: &Value) -> impl Iterator<Item = (&Value, &Value)> {
    detail["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["hosts"].as_array().into_iter().flatten().map(move |h| (w, h)))
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// The rollout halted and no host is still moving (a Failed host is final
/// only once its rollback has finished).
fn settled(detail: &Value) -> bool {
    let halted = detail["state"] == "halted";
    halted
        && hosts(detail).all(|(_, h)| {
            let state = text(&h["state"]);
            let rolling_back = h["note"].as_str() == Some("rolling back");
            matches!(state, "Converged" | "Reverted") || (state == "Failed" && !rolling_back) || state == "Pending"
        })
}

impl Seen {
    /// Records the new states; returns one line per change, as printed when piped.
    fn update(&mut self, detail: &Value) -> Vec<String> {
        let mut lines = Vec::new();
        let rollout = format!("{} (wave {})", text(&detail["state"]), detail["current_wave"].as_u64().unwrap_or(0));
        if rollout != self.rollout {
            let why = detail["halt_reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
            lines.push(format!("rollout {rollout}{why}"));
            self.rollout = rollout;
        }
        for (_, h) in hosts(detail) {
            let name = text(&h["hostname"]).to_owned();
            let state = text(&h["state"]).to_owned();
            let from = self.hosts.get(&name).map(|(s, _)| s.clone());
            if from.as_ref() != Some(&state) {
                lines.push(format!("{name:<6} {} -> {state}", from.as_deref().unwrap_or("-")));
                self.hosts.insert(name, (state, Instant::now()));
            }
        }
        lines
    }

    /// Redraws the live view over the one drawn before.
    fn redraw(&mut self, detail: &Value, say: &Say) {
        let mut view = String::new();
        if self.drawn > 0 {
            // Up to the first line of the last view, then clear to the end of the screen.
            let _ = write!(view, "\x1b[{}F\x1b[J", self.drawn);
        }
        let why = detail["halt_reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
        let mut lines =
            vec![format!("[{:>5.1}s] rollout {ROLLOUT} {}{why}", say.elapsed().as_secs_f64(), self.rollout)];
        for wave in detail["waves"].as_array().into_iter().flatten() {
            let index = wave["index"].as_u64().unwrap_or(0);
            let current = detail["current_wave"].as_u64().unwrap_or(0);
            let mark = match index.cmp(&current) {
                std::cmp::Ordering::Less => "done",
                std::cmp::Ordering::Equal => "current",
                std::cmp::Ordering::Greater => "waiting",
            };
            lines.push(format!("  wave {index} {:<8} {mark}", text(&wave["name"])));
            for h in wave["hosts"].as_array().into_iter().flatten() {
                let name = text(&h["hostname"]);
                let since = self.hosts.get(name).map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
                let note = h["note"].as_str().unwrap_or("");
                let line = format!("    {name:<8} {:<11} {since:>5.1}s  {note}", text(&h["state"]));
                lines.push(line.trim_end().to_owned());
            }
        }
        self.drawn = lines.len();
        for line in lines {
            // A wrapped line would throw off the redraw's line count.
            let fits: String = line.chars().take(MAX_LIVE_LINE_CHARS).collect();
            view.push_str(&fits);
            if fits.len() < line.len() {
                view.push('…');
            }
            view.push('\n');
        }
        let _ = print_stdout(&view);
    }
}

/// The final per-host table, labelled with the mode the closures were made
/// in, and what happened to the failed hosts (`quarantined`: the `quarantined`
/// list of the CP's `/v1/status`).
pub fn report(detail: &Value, quarantined: &Value, hosts_run: &[Host], label: &str) -> String {
    let mut table = format!("\nclosures: {label}\nHOST    WAVE  STATE       RUNNING     NOTE\n");
    for (wave, h) in hosts(detail) {
        let name = text(&h["hostname"]);
        let running = hosts_run
            .iter()
            .find(|host| host.name == name)
            .and_then(|host| std::fs::canonicalize(host.root.join("current-system")).ok())
            .map(|p| p.display().to_string().rsplit_once('-').map_or(String::new(), |(_, tail)| tail.to_owned()))
            .unwrap_or_default();
        let note = h["note"].as_str().or_else(|| h["failure"]["cause"].as_str()).unwrap_or("");
        let row = format!(
            "{name:<7} {:<5} {:<11} {running:<11} {note}",
            wave["index"].as_u64().unwrap_or(0),
            text(&h["state"])
        );
        table.push_str(row.trim_end());
        table.push('\n');
    }
    let scripted = hosts_run.iter().find(|h| h.probe_fails).map(|h| h.name.as_str());
    let state = detail["halt_reason"].as_str().map_or_else(|| text(&detail["state"]).to_owned(), str::to_owned);
    let _ = writeln!(table, "\nrollout {ROLLOUT}: {state}");
    for line in outcome(detail, quarantined, scripted) {
        let _ = writeln!(table, "{line}");
    }
    table
}

/// One sentence per host that failed, built from what the CP says: why it
/// failed, whether it rolled back (Reverted) or is still Failed, and whether
/// its closure is quarantined; then, if the host scripted to fail did not,
/// where it stands. "no host failed" when none did.
pub fn outcome(detail: &Value, quarantined: &Value, scripted: Option<&str>) -> Vec<String> {
    let is_quarantined = |host: &str, closure: &Value| {
        quarantined.as_array().into_iter().flatten().any(|q| {
            q["rollout_id"] == ROLLOUT && (q["hostname"] == host || (!closure.is_null() && q["closure"] == *closure))
        })
    };
    let mut lines = Vec::new();
    for (_, h) in hosts(detail) {
        let (name, state) = (text(&h["hostname"]), text(&h["state"]));
        if !matches!(state, "Failed" | "Reverted") {
            continue;
        }
        let why = match h["failure"]["cause"].as_str() {
            Some("sustained_probe_failure") => "its probe failed".to_owned(),
            Some("activation_failed") => {
                format!("its activation failed (exit {})", h["failure"]["exit_code"].as_i64().unwrap_or(-1))
            }
            Some("wrong_closure") => "it came up running another closure".to_owned(),
            Some("dispatch_rejected") => format!("it refused the dispatch ({})", text(&h["failure"]["reason"])),
            _ => "it failed".to_owned(),
        };
        let back = if state == "Reverted" {
            "it rolled back to the closure it ran before"
        } else {
            "it has not rolled back (still Failed)"
        };
        let kept = if is_quarantined(name, &h["target_closure"]) {
            "its closure is quarantined"
        } else {
            "its closure is not quarantined"
        };
        lines.push(format!("{name}: {why}, {back}, and {kept}."));
    }
    if lines.is_empty() {
        lines.push("no host failed.".to_owned());
    }
    if let Some(scripted) = scripted {
        let row = hosts(detail).map(|(_, h)| h).find(|h| h["hostname"] == scripted);
        let state = row.map_or("absent", |h| text(&h["state"]));
        if !matches!(state, "Failed" | "Reverted") {
            let note = row.and_then(|h| h["note"].as_str()).map(|n| format!(" ({n})")).unwrap_or_default();
            lines.push(format!("{scripted}, whose probe was scripted to fail, is {state}{note}."));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn detail(hosts: &[Value]) -> Value {
        json!({"state": "halted", "waves": [{"index": 1, "hosts": hosts}]})
    }

    fn host(name: &str, state: &str, cause: Option<&str>) -> Value {
        let mut h = json!({"hostname": name, "state": state, "target_closure": format!("/nix/store/x-{name}")});
        if let Some(cause) = cause {
            h["failure"] = json!({"cause": cause, "exit_code": 3, "reason": "bad signature"});
        }
        h
    }

    fn quarantine(name: &str) -> Value {
        json!([{"channel": "demo", "closure": format!("/nix/store/x-{name}"), "rollout_id": ROLLOUT,
            "hostname": name, "quarantined_at": "2026-11-25T12:00:00Z"}])
    }

    #[test]
    fn the_scripted_host_reverted_and_quarantined() {
        let d = detail(&[host("web-2", "Converged", None), host("web-3", "Reverted", Some("sustained_probe_failure"))]);
        assert_eq!(
            outcome(&d, &quarantine("web-3"), Some("web-3")),
            ["web-3: its probe failed, it rolled back to the closure it ran before, and its closure is quarantined."]
        );
    }

    #[test]
    fn another_host_failed_and_the_scripted_one_is_still_pending() {
        let d = detail(&[host("web-2", "Failed", Some("activation_failed")), host("web-3", "Pending", None)]);
        let mut d = d;
        d["waves"][0]["hosts"][1]["note"] = json!("waiting for wave 0 to settle");
        assert_eq!(
            outcome(&d, &json!([]), Some("web-3")),
            [
                "web-2: its activation failed (exit 3), it has not rolled back (still Failed), and its closure is not quarantined.",
                "web-3, whose probe was scripted to fail, is Pending (waiting for wave 0 to settle).",
            ]
        );
    }

    #[test]
    fn two_hosts_failed_each_is_named_and_none_is_invented() {
        let d = detail(&[
            host("web-1", "Reverted", Some("wrong_closure")),
            host("web-4", "Reverted", Some("dispatch_rejected")),
        ]);
        let lines = outcome(&d, &quarantine("web-1"), None);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("web-1: it came up running another closure, it rolled back")
                && lines[0].ends_with("is quarantined.")
        );
        assert!(
            lines[1].starts_with("web-4: it refused the dispatch (bad signature)")
                && lines[1].ends_with("is not quarantined.")
        );
    }

    #[test]
    fn nobody_failed() {
        let d = detail(&[host("web-1", "Converged", None)]);
        assert_eq!(outcome(&d, &json!([]), None), ["no host failed."]);
    }
}
