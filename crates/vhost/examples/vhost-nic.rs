//! Connects to the two vhost-user NIC sockets a QEMU serves (`-chardev
//! socket,server=on,path=DIR/n0.sock` and `n1.sock`) and prints their counters every second,
//! for trying a QEMU by hand: `cargo run -p telvirt-vhost --example vhost-nic -- DIR`.
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: vhost-nic DIR")?;
    let dir = std::path::Path::new(&dir);
    let a = telvirt_vhost::NicSocket::open(&dir.join("n0.sock"), "n0")?;
    let b = telvirt_vhost::NicSocket::open(&dir.join("n1.sock"), "n1")?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        for n in [&a, &b] {
            let s = n.stats();
            println!(
                "{}: running {} connections {}",
                n.path().display(),
                n.is_running(),
                s.connections.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
}
