//! Module boundaries, checked by reading the sources: the machine does no
//! I/O, reads no clock and never awaits, the two roles do not import each
//! other, the import circles stay broken, limits are named `MAX_X`, and
//! only the store names SQL.

/// The machine's own sources: every `.rs` file under `src/machine/` except
/// the modules `mod.rs` declares under `#[cfg(test)]` (the tests, which
/// may do I/O), so a new file is covered without being listed.
fn machine_sources() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/machine");
    let mod_rs = std::fs::read_to_string(dir.join("mod.rs")).expect("read src/machine/mod.rs");
    let lines: Vec<&str> = mod_rs.lines().map(str::trim).collect();
    let test_modules: Vec<&str> = lines
        .windows(2)
        .filter(|w| w[0] == "#[cfg(test)]")
        .filter_map(|w| w[1].strip_prefix("mod ").and_then(|m| m.strip_suffix(';')))
        .collect();
    let mut sources = Vec::new();
    for file in rust_files(&dir) {
        let rel = file.strip_prefix(&dir).expect("under src/machine").to_string_lossy().into_owned();
        let first = rel.split('/').next().unwrap_or_default();
        if test_modules.iter().any(|m| first == *m || first == format!("{m}.rs")) {
            continue;
        }
        sources.push((rel, std::fs::read_to_string(&file).expect("read source")));
    }
    sources
}

#[test]
fn the_machine_module_does_no_io_reads_no_clock_and_never_awaits() {
    // Proves the functional-core boundary (ARCHITECTURE.md's first
    // invariant) by reading the module's own sources, every file of it
    // but its tests: none of these may appear outside comments.
    let sources = machine_sources();
    let names: Vec<&str> = sources.iter().map(|(name, _)| name.as_str()).collect();
    for known in ["mod.rs", "event.rs", "state.rs", "effect.rs", "step.rs", "gates.rs"] {
        assert!(names.contains(&known), "src/machine/{known} not read (read: {names:?})");
    }
    assert!(!names.iter().any(|n| n.starts_with("tests") || n.starts_with("proptests")), "{names:?}");
    let forbidden = [
        "tokio",
        "hyper",
        "rusqlite",
        "std::fs",
        "fs_err",
        "std::net",
        "std::process",
        "std::io",
        "std::env",
        "std::thread",
        "SystemTime",
        "Instant",
        "now_utc",
        "now_local",
        "async ",
        ".await",
        "crate::clock",
        "crate::wire",
        "crate::queue",
        "crate::cp",
        "crate::agent",
    ];
    for (file, text) in &sources {
        for (line_idx, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                assert!(!code.contains(word), "src/machine/{file}:{} uses {word:?}: {line}", line_idx + 1);
            }
        }
    }
}

/// Every `.rs` file at or under `path`.
fn rust_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).expect("read source dir") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

/// Whether `line` holds `word` as a whole path: `crate::cli` is not found
/// in `crate::client`, nor `routes::` in `view_routes::`.
fn names(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back().is_some_and(ident) && word.starts_with(ident);
        let after = line[at + word.len()..].chars().next().is_some_and(ident) && word.ends_with(ident);
        !before && !after
    })
}

#[test]
fn the_roles_do_not_import_each_other() {
    // Proves the module boundary between the two roles: the agent never
    // names the control plane, and neither the control plane nor the
    // command-line types name the agent (what both use lives in `client`,
    // `signal`, `output` and `cli`); and that the import circles stay
    // broken (CP config / server / routes; the CLI and the tools and the
    // simulator). It walks the directories, so a new file is covered too;
    // comments count, like `grep -rn` would.
    assert!(names("use crate::cli::QueueCommand;", "crate::cli") && !names("use crate::client;", "crate::cli"));
    assert!(names("super::routes::X", "routes::") && !names("use view_routes::view;", "routes::"));
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules = [
        ("agent", "crate::cp"),
        ("cp", "crate::agent"),
        ("cli.rs", "crate::agent"),
        ("cli", "crate::agent"),
        // The CP's config is a leaf: the server, the routes and the command
        // line all read it, so it names neither the server nor the routes;
        // and the routes never name the server that runs them.
        ("cp/config.rs", "server::"),
        ("cp/config.rs", "::server"),
        ("cp/config.rs", "routes::"),
        ("cp/config.rs", "::routes"),
        ("cp/routes.rs", "server::"),
        ("cp/routes.rs", "::server"),
        ("cp/routes", "server::"),
        ("cp/routes", "::server"),
        // The store's writer adds to a histogram (a leaf), and `/metrics`
        // reads the store: the store never names the metrics.
        ("cp/store", "metrics::"),
        ("cp/store", "::metrics"),
        ("cp/histogram.rs", "metrics::"),
        ("cp/histogram.rs", "store::"),
        // The command line's types are read by the commands; the CLI does
        // not call back into the tools' or the simulator's code that reads
        // it, so neither names `crate::cli`.
        ("tools", "crate::cli"),
        ("sim", "crate::cli"),
    ];
    for (under, word) in rules {
        let files = rust_files(&src.join(under));
        assert!(!files.is_empty(), "no sources under src/{under}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for (line_idx, line) in text.lines().enumerate() {
                assert!(!names(line, word), "{}:{} uses {word:?}: {line}", file.display(), line_idx + 1);
            }
        }
    }
}

/// The words of a constant's name in `line`, if it declares one.
fn const_name(line: &str) -> Option<&str> {
    let code = line.trim_start();
    let code = code.strip_prefix("pub ").unwrap_or(code);
    let code = code.strip_prefix("pub(crate) ").unwrap_or(code);
    let rest = code.strip_prefix("const ").or_else(|| code.strip_prefix("static "))?;
    let name = rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next()?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).then_some(name)
}

/// Whether a limit's name follows the vocabulary (ARCHITECTURE.md): `MAX`
/// or `MIN` comes first (`MAX_BODY_BYTES`), or after `SOFT` for a soft cap.
fn limit_name_ok(name: &str) -> bool {
    let words: Vec<&str> = name.split('_').collect();
    match words.iter().position(|w| *w == "MAX" || *w == "MIN") {
        None | Some(0) => true,
        Some(1) => words[0] == "SOFT",
        Some(_) => false,
    }
}

#[test]
fn limit_constants_are_named_max_x() {
    // Proves the vocabulary rule for limits over every constant in `src/`
    // (tests included): `MAX_X` / `MIN_X`, never `X_MAX`.
    assert!(limit_name_ok("MAX_BODY_BYTES") && limit_name_ok("SOFT_MAX_PENDING_COUNT") && limit_name_ok("FD_HEADROOM"));
    assert!(!limit_name_ok("PEM_FILE_MAX_BYTES") && !limit_name_ok("SHORT_TEXT_MAX_BYTES") && !limit_name_ok("X_MIN"));
    assert_eq!(const_name("pub const MAX_SEQ: u64 = 1;"), Some("MAX_SEQ"));
    assert_eq!(const_name("    const A_MAX: usize = 1;"), Some("A_MAX"));
    assert_eq!(const_name("let x = 1;"), None);
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).expect("read source");
        for (line_idx, line) in text.lines().enumerate() {
            if let Some(name) = const_name(line).filter(|n| !limit_name_ok(n)) {
                wrong.push(format!("{}:{}: {name}", file.display(), line_idx + 1));
            }
        }
    }
    assert!(wrong.is_empty(), "limits named X_MAX instead of MAX_X:\n{}", wrong.join("\n"));
}

/// The SQL words `line` holds inside a string literal (after an odd number
/// of `"` on the line), outside a `//` comment line.
fn sql_in_string<'a>(line: &str, words: &[&'a str]) -> Vec<&'a str> {
    if line.trim_start().starts_with("//") {
        return Vec::new();
    }
    words
        .iter()
        .filter(|word| line.match_indices(**word).any(|(at, _)| line[..at].matches('"').count() % 2 == 1))
        .copied()
        .collect()
}

#[test]
fn only_the_store_names_sql() {
    // Proves that the SQL stays behind `cp::store` (the seam a second
    // backend would replace): no other file under `src/` has a query or a
    // pragma in a string literal (the simulator included: its checks read
    // the CP's database through the store's functions). This file is
    // skipped for its own word list.
    let words = ["SELECT ", "INSERT ", "PRAGMA ", "DELETE FROM ", "CREATE TABLE "];
    assert_eq!(sql_in_string(r#"conn.prepare("SELECT seq FROM event_log")"#, &words), ["SELECT "]);
    assert!(sql_in_string("// PRAGMA integrity_check", &words).is_empty());
    assert!(sql_in_string("/// checked (`PRAGMA integrity_check`) and", &words).is_empty());
    assert!(sql_in_string(r#"let x = "a"; // SELECT in a comment"#, &words).is_empty());
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let exempt = [src.join("cp/store"), src.join("machine/tests/boundaries.rs")];
    let mut found = Vec::new();
    for file in rust_files(&src) {
        if exempt.iter().any(|e| file.starts_with(e)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for (line_idx, line) in text.lines().enumerate() {
            for word in sql_in_string(line, &words) {
                found.push(format!("{}:{}: {word:?}: {}", file.display(), line_idx + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "SQL outside src/cp/store:\n{}", found.join("\n"));
}
