//! The README's close-code table is the gateway's own: every row of `close::TABLE` is in it
//! with the same code, reason and blame, and every row in it is a code the gateway sends.

use vncgate::close::{self, Blame};
use vncgate_ws::frame::{E_CLOSE_UTF8, E_TEXT, E_TOO_BIG, ProtocolError};

/// The rows of the table under "Close codes after the upgrade": (code, reason, blame).
fn readme_rows() -> Vec<(u16, String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let table = readme
        .split("### Close codes after the upgrade")
        .nth(1)
        .expect("the README has a close-code section");
    let table = &table[table
        .find("| code | reason | blame |")
        .expect("the table's header")..];
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            // "1000 / as sent": the browser's own code, echoed, is not the gateway's.
            let code = cells[0].parse().ok()?;
            Some((code, cells[1].to_owned(), cells[2].to_owned()))
        })
        .collect()
}

#[test]
fn readme_close_table_matches_the_gateways() {
    let rows = readme_rows();
    assert!(rows.len() >= close::TABLE.len(), "{rows:?}");
    for c in close::TABLE {
        let row = rows
            .iter()
            .find(|r| r.0 == c.code)
            .unwrap_or_else(|| panic!("README lacks close code {} ({})", c.code, c.name));
        assert_eq!(row.1, c.reason, "reason of {}", c.code);
        assert_eq!(row.2, c.blame.as_str(), "blame of {}", c.code);
    }
    // Protocol errors: the browser's fault, with the frame parser's reasons (1002 has many).
    let protocol: Vec<ProtocolError> = vec![E_TEXT, E_CLOSE_UTF8, E_TOO_BIG];
    for (code, reason, blame) in &rows {
        if close::TABLE.iter().any(|c| c.code == *code) {
            continue;
        }
        let cause = match protocol.iter().find(|e| e.code == *code) {
            Some(e) => close::protocol(*e),
            None if *code == 1002 => close::protocol(vncgate_ws::frame::E_RSV),
            None => panic!("README lists close code {code}, which the gateway never sends"),
        };
        assert_eq!(blame, cause.blame.as_str(), "blame of {code}");
        assert_eq!(cause.blame, Blame::Browser);
        if *code != 1002 {
            assert_eq!(reason, cause.reason, "reason of {code}");
        }
    }
}
