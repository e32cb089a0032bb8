//! A TCP relay whose connections can be silenced: what a client meets
//! when the far end of a connection dies unannounced, or a NAT or firewall
//! forgets it. For the tests of the HTTP client and of a store's own
//! connections to its database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A relay to `target` on a port of its own, whose address it answers with
/// a function: each call silences the connections open at that moment, as a
/// connection does whose far end died unannounced or that a firewall
/// forgot. They stay open and carry nothing either way; connections opened
/// later relay.
pub async fn silencing_relay(target: SocketAddr) -> (SocketAddr, impl Fn()) {
    async fn pass(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        silenced: impl Fn() -> bool,
    ) {
        let mut buffer = vec![0u8; 64 << 10];
        while let Ok(read @ 1..) = from.read(&mut buffer).await {
            if !silenced() && to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
        if silenced() {
            // Closing would tell the far end; a silent connection never does.
            std::future::pending::<()>().await;
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let epoch = Arc::new(AtomicU64::new(0));
    let relaying = Arc::clone(&epoch);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let opened = relaying.load(Ordering::SeqCst);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                let epoch = Arc::clone(&relaying);
                tokio::spawn(pass(from, to, move || {
                    epoch.load(Ordering::SeqCst) != opened
                }));
            }
        }
    });
    let silence = move || {
        epoch.fetch_add(1, Ordering::SeqCst);
    };
    (address, silence)
}
