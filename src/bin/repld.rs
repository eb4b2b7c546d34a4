//! `repld`: the replblk daemon. Thin: parses arguments and runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "repld",
    version,
    about = "replblk daemon: serves replicated volumes over NBD"
)]
struct Args {
    /// Configuration file (TOML); see examples/replblk.toml.
    #[arg(long, short, required_unless_present = "demo")]
    config: Option<PathBuf>,
    /// This node's name in the configuration (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Start a self-contained demo with embedded defaults instead.
    #[arg(long, conflicts_with = "config")]
    demo: bool,
    /// Parse and validate the configuration for this node, print a summary
    /// and exit (0: valid; 1: the reason on stderr). Opens and binds nothing.
    #[arg(long, requires = "config")]
    check_config: bool,
    /// Write this process's PID to this file once the configuration is
    /// valid (removed again at exit), for service managers and the OCF
    /// resource agent.
    #[arg(long, requires = "config")]
    pidfile: Option<PathBuf>,
    /// TCP port for the demo Primary's NBD export (the next three ports
    /// are used by the Secondary and the replication link).
    #[arg(long, default_value_t = 10809, requires = "demo")]
    demo_port: u16,
    /// Directory for the demo's temporary files (default: $TMPDIR).
    #[arg(long, requires = "demo")]
    demo_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_config {
        let path = args.config.unwrap_or_default();
        let node = args.node.unwrap_or_else(replblk::daemon::default_node_name);
        return match replblk::daemon::check_config(&path, &node) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("repld: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    replblk::daemon::init_logging();
    replblk::faults::init_from_env();
    let result = if args.demo {
        replblk::daemon::demo(args.demo_port, args.demo_dir.as_deref())
    } else {
        let path = args.config.unwrap_or_default();
        replblk::config::Config::load(&path)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                let node = args.node.unwrap_or_else(replblk::daemon::default_node_name);
                let _pidfile = match &args.pidfile {
                    Some(p) => Some(replblk::daemon::PidFile::create(p)?),
                    None => None,
                };
                replblk::daemon::run(&config, &node, Some(&path))
            })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("repld: {e:#}");
            ExitCode::FAILURE
        }
    }
}
