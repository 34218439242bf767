//! `docs/protocol.md` is the project's contract; its typed JSON examples are
//! parsed here by the same parsers the product uses, so the document cannot
//! drift from the code.

use std::collections::BTreeMap;

use nixfleet::agent::probes::HealthChecks;
use nixfleet::wire::{
    Dispatch, ErrorBody, EventBatch, EventBatchResponse, Heartbeat, HeartbeatResponse, Manifest, OutboundEvent,
    ResultStatus,
};

/// One ```json <tag> block: its tag, the line of its opening fence, its text.
struct Block {
    tag: String,
    line: usize,
    text: String,
}

/// The ```json <tag> blocks of the document, in order; a ```json block
/// without a tag (which no parser would check) or an unterminated block is
/// an error naming its line.
fn typed_blocks(doc: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    for (idx, line) in doc.lines().enumerate() {
        match current.as_mut() {
            None => {
                if let Some(after) = line.strip_prefix("```json") {
                    let tag = after.trim();
                    if tag.is_empty() {
                        return Err(format!(
                            "docs/protocol.md:{}: a ```json block without a type tag (```json manifest, \
                             ```json event, …): no parser would check it",
                            idx + 1
                        ));
                    }
                    current = Some(Block { tag: tag.to_owned(), line: idx + 1, text: String::new() });
                }
            }
            Some(_) if line.starts_with("```") => blocks.extend(current.take()),
            Some(block) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
        }
    }
    match current {
        Some(block) => Err(format!("docs/protocol.md:{}: an unterminated code block", block.line)),
        None => Ok(blocks),
    }
}

#[test]
fn a_json_block_without_a_type_tag_is_refused_naming_its_line() {
    // Proves the document check cannot be dodged by leaving a block untagged
    // (it would then be parsed by nothing): the block is an error naming its
    // line, as is an unterminated one; a tagged block is read with its line.
    let doc = "# t\n\n```json event\n{}\n```\n\n```json\n{}\n```\n";
    let err = typed_blocks(doc).err().expect("an untagged block is refused");
    assert!(err.contains("docs/protocol.md:7:") && err.contains("without a type tag"), "{err}");
    let err = typed_blocks("```json event\n{}\n").err().expect("an unterminated block is refused");
    assert!(err.contains("docs/protocol.md:1:") && err.contains("unterminated"), "{err}");
    let blocks = typed_blocks("text\n```json manifest\n{}\n```\n").expect("a tagged block");
    assert_eq!(
        blocks.iter().map(|b| (b.tag.as_str(), b.line, b.text.as_str())).collect::<Vec<_>>(),
        [("manifest", 2, "{}\n")]
    );
}

#[track_caller]
fn fail<T>(block: &Block, e: &dyn std::fmt::Display) -> T {
    panic!("docs/protocol.md:{}: the `{}` example does not parse: {e}\n{}", block.line, block.tag, block.text)
}

#[test]
fn every_typed_json_example_in_the_protocol_document_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md");
    let doc = std::fs::read_to_string(&path).expect("docs/protocol.md");
    let blocks = typed_blocks(&doc).unwrap_or_else(|e| panic!("{e}"));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for block in &blocks {
        let (tag, text) = (&block.tag, &block.text);
        let bytes = text.as_bytes();
        match tag.as_str() {
            "manifest" => drop(Manifest::parse(bytes).unwrap_or_else(|e| fail(block, &e))),
            "envelope" => drop(nixfleet::sign::parse_envelope(bytes).unwrap_or_else(|e| fail(block, &e))),
            "error" => drop(serde_json::from_slice::<ErrorBody>(bytes).unwrap_or_else(|e| fail(block, &e))),
            "dispatch" => drop(serde_json::from_slice::<Dispatch>(bytes).unwrap_or_else(|e| fail(block, &e))),
            "batch" => {
                let batch = EventBatch::parse(bytes).unwrap_or_else(|e| fail(block, &e));
                for item in &batch.events {
                    item.event.to_body().unwrap_or_else(|e| fail(block, &e));
                }
            }
            "event" => {
                let event: OutboundEvent = serde_json::from_slice(bytes).unwrap_or_else(|e| fail(block, &e));
                event.to_body().unwrap_or_else(|e| fail(block, &e));
            }
            "results" => {
                let results: EventBatchResponse = serde_json::from_slice(bytes).unwrap_or_else(|e| fail(block, &e));
                let gap = results.results.iter().find(|r| r.status == ResultStatus::Gap);
                assert!(
                    gap.is_some_and(|g| g.expected_seq.is_some()),
                    "docs/protocol.md:{}: the gap example names expected_seq",
                    block.line
                );
            }
            "heartbeat" => drop(serde_json::from_slice::<Heartbeat>(bytes).unwrap_or_else(|e| fail(block, &e))),
            "heartbeat-response" => {
                drop(serde_json::from_slice::<HeartbeatResponse>(bytes).unwrap_or_else(|e| fail(block, &e)))
            }
            "health-checks" => drop(HealthChecks::parse(text).unwrap_or_else(|e| fail(block, &e))),
            "operator-action" => drop(
                serde_json::from_slice::<nixfleet::cp::store::ActionRecord>(bytes).unwrap_or_else(|e| fail(block, &e)),
            ),
            "plan-preview" => drop(
                serde_json::from_slice::<nixfleet::cp::preview::PlanPreview>(bytes).unwrap_or_else(|e| fail(block, &e)),
            ),
            other => panic!("docs/protocol.md:{}: a ```json block tagged `{other}` that no parser checks", block.line),
        }
        *seen.entry(tag.clone()).or_default() += 1;
    }
    // Every kind of example is present, so deleting one is noticed too.
    for tag in [
        "manifest",
        "envelope",
        "error",
        "dispatch",
        "batch",
        "event",
        "results",
        "heartbeat",
        "heartbeat-response",
        "health-checks",
        "operator-action",
        "plan-preview",
    ] {
        assert!(seen.contains_key(tag), "docs/protocol.md lost its `{tag}` example");
    }
}

/// Why `line` (after `previous`) cites something a clone of the repository
/// does not hold, if it does: the product contract or notes kept outside it,
/// an issue tracker's numbers, a task brief, or a bare `§N` that does not
/// say which document it means. The words are assembled, so this file's own
/// source is checked too.
fn outside_citation(previous: &str, line: &str) -> Option<String> {
    let low = line.to_lowercase();
    let spec = ["spec", " §"].concat();
    let shared = ["..", "/shared"].concat();
    let defect = ["reference", " defect"].concat();
    let brief = ["the", " brief"].concat();
    for word in [&spec, &shared, &defect, &brief] {
        if low.contains(word.as_str()) {
            return Some(format!("cites {word:?}, which is not in the repository"));
        }
    }
    let issue = ["iss", "ue "].concat();
    for (at, _) in low.match_indices(issue.as_str()) {
        let word_start = low[..at].chars().next_back().is_none_or(|c| !c.is_alphabetic());
        let rest = low[at + issue.len()..].trim_start_matches('#');
        if word_start && rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Some("cites an issue tracker's number".to_owned());
        }
    }
    let section = line
        .match_indices('§')
        .any(|(at, _)| line[at + '§'.len_utf8()..].trim_start().starts_with(|c: char| c.is_ascii_digit()));
    let named = |l: &str| l.contains("protocol.md") || l.contains("RFC");
    if section && !named(line) && !named(previous) {
        return Some(
            "cites a § without naming its document (docs/protocol.md, an RFC) on the line or the one before".to_owned(),
        );
    }
    None
}

#[test]
fn the_citation_check_catches_each_kind() {
    // Proves the check below can fail: each kind of outside citation is
    // caught, and the in-repository forms pass.
    let s = |parts: &[&str]| parts.concat();
    let caught = [
        s(&["// see SP", "EC §", "4.2"]),
        s(&["see ../sha", "red/notes.md"]),
        s(&["fixes Reference ", "defect 3"]),
        s(&["The bri", "ef asked for it"]),
        s(&["(iss", "ue 9)"]),
        s(&["iss", "ue #12"]),
        s(&["a bare rule (§", "3 rule 8)"]),
    ];
    for line in &caught {
        assert!(outside_citation("", line).is_some(), "{line}");
    }
    for line in [
        "`docs/protocol.md` §3 rule 8",
        "RFC 8032 §7.1",
        "a tissue 5 and an issue without a number",
        "the divergence 8 in docs/simulator.md",
    ] {
        assert_eq!(outside_citation("", line), None, "{line}");
    }
    assert_eq!(outside_citation("see `docs/protocol.md`", "§3 rule 10"), None);
}

/// Every file at or under `path`.
fn files_under(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn no_citation_points_outside_the_repository() {
    // Proves the repository explains itself: no source, test or document
    // cites the product contract or notes kept outside it, an issue number,
    // a brief, or a bare § (docs/protocol.md itself numbers its own sections).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for top in ["src", "tests", "docs", "README.md", "ARCHITECTURE.md"] {
        for file in files_under(&root.join(top)) {
            let rel = file.strip_prefix(root).expect("under the root").display().to_string();
            let text = String::from_utf8_lossy(&std::fs::read(&file).expect("read")).into_owned();
            let mut previous = "";
            for (idx, line) in text.lines().enumerate() {
                let why = outside_citation(previous, line);
                if let Some(why) = why.filter(|w| rel != "docs/protocol.md" || !w.contains('§')) {
                    problems.push(format!("{rel}:{}: {why}: {}", idx + 1, line.trim()));
                }
                previous = line;
            }
        }
    }
    assert!(problems.is_empty(), "citations outside the repository:\n{}", problems.join("\n"));
}
