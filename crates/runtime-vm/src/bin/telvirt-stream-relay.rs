//! `telvirt-stream-relay source|destination`: one end of a sealed guest stream, as
//! `stream_seal` starts it (the connection at descriptor 3, QEMU's socket at 4, the key on
//! standard input). The `telvirt` binary runs the same as `telvirt stream-relay`; this one
//! serves programs that embed the vm runtime without it (its own tests).

fn main() {
    let end = std::env::args()
        .nth(1)
        .and_then(|a| telvirt_runtime_vm::stream_seal::parse_end(&a));
    let Some(end) = end else {
        eprintln!("usage: telvirt-stream-relay source|destination (started by telvirt only)");
        std::process::exit(2);
    };
    if let Err(e) = telvirt_runtime_vm::stream_seal::relay_main(end) {
        eprintln!("telvirt-stream-relay: {e}");
        std::process::exit(1);
    }
}
