//! `telvirt-stream-relay source|destination [UID]`: one end of a sealed guest stream, as
//! `stream_seal` starts it (the connection at descriptor 3, QEMU's socket at 4, the key on
//! standard input). The `telvirt` binary runs the same as `telvirt stream-relay`; this one
//! serves programs that embed the vm runtime without it (its own tests).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let end = args
        .first()
        .and_then(|a| telvirt_runtime_vm::stream_seal::parse_end(a));
    let run_as = match args.get(1).map(|a| a.parse::<u32>()) {
        None => Ok(None),
        Some(Ok(uid)) => Ok(Some(uid)),
        Some(Err(e)) => Err(e),
    };
    let (Some(end), Ok(run_as), None) = (end, run_as, args.get(2)) else {
        eprintln!("usage: telvirt-stream-relay source|destination [UID] (started by telvirt only)");
        std::process::exit(2);
    };
    if let Err(e) = telvirt_runtime_vm::stream_seal::relay_main(end, run_as) {
        eprintln!("telvirt-stream-relay: {e}");
        std::process::exit(1);
    }
}
