//! The application's state blob travels with the listeners and arrives intact, generation after
//! generation.

mod common;

use common::{EchoOpts, EchoServer};

#[test]
fn state_blob_arrives_intact_at_each_generation() {
    let out_dir = std::env::temp_dir().join(format!("ringflip-state-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("state");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--handoff-state".into(),
            "ticket-keys:0123456789abcdef".into(),
            "--state-out".into(),
            out.display().to_string(),
        ],
        ..EchoOpts::default()
    });
    assert!(!out.exists(), "a first start has no inherited state");
    for _ in 0..3 {
        let old = server.pid();
        server.upgrade();
        let got = std::fs::read_to_string(&out).expect("the new generation wrote its state");
        assert_eq!(got, format!("ticket-keys:0123456789abcdef from {old}"));
    }
    server.stop();
    let _ = std::fs::remove_dir_all(&out_dir);
}
