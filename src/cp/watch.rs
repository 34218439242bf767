//! `nixfleet cp status --rollout ID --watch`: the rollout's table, asked
//! for every `--interval` until the rollout needs nobody any more
//! (completed, cancelled, superseded) or needs an operator (halted). On a
//! terminal the table is redrawn in place; piped, each changed table is
//! printed once under a `--- TIME` line (with `--json`: one compact JSON
//! document per line).

use std::io::IsTerminal;

use hyper::Method;

use super::cmd::{render_rollout, CpError};
use super::planner::RolloutState;
use super::views::RolloutDetail;
use crate::cli::CpStatusArgs;
use crate::client::{self, ClientError, CpUrl};
use crate::output::print_stdout;

/// Failed requests in a row a watch rides out (a CP restarting) before it
/// gives up with the last error.
pub const MAX_WATCH_FAILURES: usize = 10;

/// Whether a watch stops at this state: nothing will change without an
/// operator (halted) or at all (the terminal states).
pub fn watch_ends(state: RolloutState) -> bool {
    state.is_terminal() || state == RolloutState::Halted
}

pub async fn watch_cmd(args: CpStatusArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let Some(id) = args.rollout.as_deref() else { return Ok(()) };
    let path = format!("/v1/rollouts/{}", id.replace('@', "%40"));
    let tty = std::io::stdout().is_terminal();
    let clock = crate::clock::ClockHandle::system();
    let mut shown = String::new();
    let mut n_lines = 0usize;
    let mut failures = 0usize;
    loop {
        let detail: RolloutDetail = match fetch(&url, &path).await {
            Ok(d) => {
                failures = 0;
                d
            }
            // Only the transport is retried: a 4xx (unknown rollout) will not change.
            Err(
                e @ CpError::Client(
                    ClientError::Connect { .. } | ClientError::Timeout { .. } | ClientError::Http { .. },
                ),
            ) if failures + 1 < MAX_WATCH_FAILURES => {
                failures += 1;
                tracing::warn!(error = %e, "status request failed; trying again");
                tokio::time::sleep(args.interval).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let text = if args.json {
            format!("{}\n", serde_json::to_string(&detail).unwrap_or_default())
        } else {
            render_rollout(&detail)
        };
        if text != shown {
            let mut frame = String::new();
            if tty && n_lines > 0 {
                // Cursor up over the last frame, then clear to the end.
                frame.push_str(&format!("\x1b[{n_lines}A\x1b[J"));
            }
            if !tty && !args.json {
                // Piped: each table under a line saying when it was seen.
                frame.push_str(&format!("--- {}\n", crate::cp::store::ts(clock.now())));
            }
            frame.push_str(&text);
            print_stdout(&frame).map_err(CpError::Stdout)?;
            n_lines = text.lines().count();
            shown = text;
        }
        if watch_ends(detail.summary.state) {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

async fn fetch(url: &CpUrl, path: &str) -> Result<RolloutDetail, CpError> {
    let resp = client::request(url, Method::GET, path, &[], None).await?;
    Ok(resp.json()?)
}
