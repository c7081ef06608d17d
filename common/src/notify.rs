//! The systemd readiness protocol (`sd_notify`): a daemon started with
//! `Type=notify` tells the service manager it is ready, and that it is
//! stopping, by sending datagrams to the socket named in `NOTIFY_SOCKET`.
//! Without that variable (not under systemd) these are no-ops.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager, if any. Errors
/// are logged, never fatal: readiness notification is advisory.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket: "@name".
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "cannot notify the service manager");
    }
}

/// The daemon is ready to serve.
pub fn ready() {
    notify("READY=1");
}

/// The daemon is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("rmem-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in this binary touching
        // NOTIFY_SOCKET, and no other thread reads the environment while it
        // runs.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        ready();
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
