//! Where the load generator talks to the operating system directly: its own file descriptor
//! limit, the source address of its sockets, and the broker's resident memory from /proc.

use std::os::fd::AsRawFd;

use crate::error::BenchError;

/// Descriptors kept free beyond the client sockets: stdio, the runtime's epoll and eventfd,
/// the /proc reads.
const SPARE_FDS: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit and checks that `sockets` client sockets
/// fit under it.
pub fn ensure_fds(sockets: u64) -> Result<u64, BenchError> {
    let need = sockets + SPARE_FDS;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(BenchError::io(
            "reading RLIMIT_NOFILE",
            std::io::Error::last_os_error(),
        ));
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let have = lim.rlim_cur;
    if have < need {
        return Err(BenchError::Limit(format!(
            "{sockets} connections need {need} file descriptors but this process may open only \
             {have} (hard limit {}); raise it, e.g. `ulimit -Hn {need}` as root, or ask for fewer \
             --connections",
            lim.rlim_max
        )));
    }
    Ok(have)
}

/// Lets `connect` pick the source port of a socket bound to an address with port 0, so the
/// port only has to be unique for the full 4-tuple (Linux `IP_BIND_ADDRESS_NO_PORT`). Without
/// it, `bind` would reserve the port for that address alone.
pub fn bind_address_no_port(socket: &impl AsRawFd) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor, and a pointer to an int of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The `VmRSS` of process `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| BenchError::io(format!("reading {path}"), e))?;
    parse_vm_rss(&text).ok_or_else(|| BenchError::Usage(format!("{path} has no VmRSS line")))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_line() {
        let status = "Name:\tpetrel\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12_345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
    }
}
