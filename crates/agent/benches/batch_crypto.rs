//! Criterion benchmark: what protecting one replication batch's body costs its two hosts, for a
//! freeze's last log (4 KiB) and a snapshot's piece (256 KiB), sender and receiver together.
//! Measured: the body encrypted (ADR 067: a key derived with HMAC-SHA256 over the batch's
//! place and header tag, an AES-256-GCM key schedule, the piece sealed, then on the receiver
//! the same derivation and schedule and the piece opened). Baseline in the same run: the
//! body's HMAC-SHA256 tag of ADR 066 (made by the sender, made again and compared by the
//! receiver). The same primitives (ring's) and sizes as the port, outside it: a diagnosis of
//! the cipher's share of a freeze, not a figure of the port.

use criterion::{Criterion, criterion_group, criterion_main};
use ring::{aead, hmac};

// Mirrors of crates/agent/src/replication.rs (private there): `BODY_LABEL` and
// `BodyCipher::new` (`derive`), the former body tag's label and `tag_context` (`tag`); kept in
// step with them by hand.

/// Bytes a derivation covers: the place (challenge, salt, number) and the header's tag.
const PLACE_BYTES: usize = 16 + 16 + 8 + 32;

fn derive(key: &hmac::Key, place: &[u8]) -> aead::LessSafeKey {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(b"telvirt replication v4 body key");
    ctx.update(place);
    let secret = ctx.sign();
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, secret.as_ref()).expect("a 32-byte key"),
    )
}

fn nonce() -> aead::Nonce {
    aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN])
}

fn tag(key: &hmac::Key, place: &[u8], body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(b"telvirt replication body");
    ctx.update(place);
    ctx.update(body);
    ctx.sign()
}

fn batch_body(c: &mut Criterion) {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &[5; 32]);
    let place = [7u8; PLACE_BYTES];
    for (name, size) in [
        ("last_log_4kib", 4 << 10),
        ("snapshot_piece_256kib", 256 << 10),
    ] {
        let body = vec![0x5au8; size];
        let mut g = c.benchmark_group(name);
        g.bench_function("encrypted_both_ends", |b| {
            let mut buf = body.clone();
            b.iter(|| {
                buf.copy_from_slice(&body);
                let sealed = derive(&key, &place)
                    .seal_in_place_separate_tag(nonce(), aead::Aad::empty(), &mut buf)
                    .expect("sealed");
                derive(&key, &place)
                    .open_in_place_separate_tag(nonce(), aead::Aad::empty(), sealed, &mut buf, 0..)
                    .expect("opened")
                    .len()
            })
        });
        g.bench_function("tagged_both_ends_baseline", |b| {
            b.iter(|| {
                let made = tag(&key, &place, &body);
                let checked = tag(&key, &place, &body);
                made.as_ref() == checked.as_ref()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, batch_body);
criterion_main!(benches);
