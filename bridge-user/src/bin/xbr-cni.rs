//! `xbr-cni`: xbr as a chained CNI plugin (see `xbr::cni`). A runtime runs it with the CNI_*
//! environment and the network configuration on stdin; it prints a result or a CNI error.

use std::io::{Read as _, Write as _};

fn main() {
    // Runtimes log a plugin's stderr; keep it to warnings unless RUST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let vars = std::env::vars().collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => xbr::cni::run(&vars, &stdin),
        Err(error) => Err(xbr::cni::CniError::new(
            xbr::cni::Code::Io,
            "xbr-cni: reading the network configuration from stdin",
            error.to_string(),
        )),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(output) => {
            if let Some(output) = output {
                let _ = writeln!(stdout, "{output}");
            }
        }
        Err(error) => {
            let version = xbr::cni::protocol::reply_version(&stdin);
            let _ = writeln!(stdout, "{}", error.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}
