#![no_main]

//! `Config::parse` and `for_node` on arbitrary text: a config file may
//! hold anything, and the answer must be a clear error, never a panic.

use libfuzzer_sys::fuzz_target;
use replblk::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse(text) {
        for node in ["alpha", "beta", ""] {
            let _ = cfg.for_node(node);
        }
        let _ = cfg.default_resource();
    }
});
