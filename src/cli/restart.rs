use super::Target;
use crate::calls::Restarted;
use crate::control::Status;
use crate::error::{Error, Result};
use std::path::PathBuf;

/// Replace the running server with a new process, without an I/O error for its clients.
#[derive(clap::Args)]
#[command(
    after_help = "The server hands the live files' FUSE connection (and with it the loop devices on\n\
them), its listening sockets and its table of attached files to a new process running\n\
BINARY (default: the server's own binary, read again from disk, so an upgraded package\n\
takes effect), which opens the pool and serves on. I/O waits meanwhile; NBD connections\n\
are closed and their clients reconnect. If the new process cannot take over, the old one\n\
serves on and this fails saying why. Prints the old and new pid and how long I/O was held.\n\n\
Examples:\n  thinlayer restart\n  thinlayer restart --binary /usr/local/bin/thinlayer-1.2"
)]
pub struct RestartArgs {
    /// The program to run instead of the server's own binary.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Machine-readable output: {"old_pid", "new_pid", "binary", "held_ms"}.
    #[arg(long)]
    json: bool,
}

/// Show the running server: pid, keeper, version, start, listeners, attachments.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Machine-readable output (the fields of docs/CONTROL.md's status).
    #[arg(long)]
    json: bool,
}

pub fn run_restart(t: &Target, a: RestartArgs) -> Result<()> {
    let binary = match a.binary {
        // The server runs it from its own directory: make the path the user means absolute.
        Some(b) => Some(
            std::path::absolute(&b)
                .map_err(|e| Error::io(format!("--binary {}", b.display()), e))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let Restarted {
        old_pid,
        new_pid,
        binary,
        held_ms,
    } = t.restart(binary)?;
    if a.json {
        let v = serde_json::json!({"old_pid": old_pid, "new_pid": new_pid,
            "binary": binary, "held_ms": held_ms});
        println!("{v}");
    } else {
        println!("restarted: pid {old_pid} -> pid {new_pid} ({binary}); I/O held {held_ms} ms");
    }
    Ok(())
}

pub fn run_status(t: &Target, a: StatusArgs) -> Result<()> {
    let s = t.status()?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&s).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        print_status(&s);
    }
    Ok(())
}

fn print_status(s: &Status) {
    println!("pid:          {}", s.pid);
    println!(
        "keeper:       {}",
        s.keeper.map_or("none".to_string(), |k| k.to_string())
    );
    println!("server:       {} ({})", s.server, s.binary);
    println!(
        "started:      {} (process {} of this serve)",
        s.started, s.generation
    );
    println!("pool:         {}", s.pool);
    println!("control:      {}", s.control);
    for l in &s.listen {
        println!("NBD:          {l}");
    }
    if let Some(c) = &s.containerd {
        println!("containerd:   {c}");
    }
    if let Some(d) = &s.files_dir {
        println!("live files:   {d} ({} attached)", s.files.len());
        for f in &s.files {
            println!("              {f}");
        }
    }
    println!("connections:  {}", s.connections.len());
    for c in &s.connections {
        println!(
            "              {} on {:?} since {}",
            c.client, c.export, c.since
        );
    }
    println!("pending:      {} bytes not yet committed", s.pending_bytes);
    let c = &s.map_cache;
    let looked = (c.hits + c.misses).max(1);
    println!(
        "map cache:    {} of {} in checksum pages, {:.1}% of {} lookups hit",
        crate::units::human(c.bytes),
        crate::units::human(c.budget),
        100.0 * c.hits as f64 / looked as f64,
        c.hits + c.misses
    );
    let m = &s.maps;
    if m.stopped {
        println!(
            "maps:         load stopped on a damaged range, changes refused ({} of {} ranges not loaded; see the server's log, `thinlayer check`)",
            m.ranges_left, m.ranges
        );
    } else if !m.loaded && m.ranges > 0 {
        println!(
            "maps:         loading in the background, {} of {} ranges left (reads and writes load what they touch first)",
            m.ranges_left, m.ranges
        );
    } else if m.loaded {
        println!("maps:         loaded");
    }
    if !s.fills.is_empty() {
        println!(
            "fetching:     {} remote layer(s) (pull --lazy)",
            s.fills.len()
        );
    }
    for f in &s.fills {
        println!(
            "              {:?} from {}: {} of {} ({} request(s)), {}{}",
            f.layer,
            f.registry,
            crate::units::human(f.fetched),
            crate::units::human(f.total),
            f.requests,
            f.state,
            f.error
                .as_ref()
                .map_or_else(String::new, |e| format!(": {e}"))
        );
    }
}
