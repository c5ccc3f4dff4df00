//! `ltd-gen --help` is the user's manual: a snapshot keeps changes to it deliberate
//! (refresh with `UPDATE_EXPECT=1 cargo test -p ltd-cli --test help`).

use std::process::Command;

#[test]
fn help_text() {
    let out = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    assert!(out.status.success());
    expect_test::expect_file!["snapshots/help.txt"]
        .assert_eq(&String::from_utf8_lossy(&out.stdout));
}
