//! The `tether` binary's own commands that need no server.

use std::process::Command;

#[test]
fn shell_completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["completions", shell]).output().expect("run tether");
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("tether") && script.contains("pools"), "{shell} script lacks the commands");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tether")).args(["completions", "cmd.exe"]).output().expect("run tether");
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
}
