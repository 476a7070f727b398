//! Write the seed corpora to `fuzz/corpus/<target>/` (or the directory given
//! as the first argument): `cargo run -p hotswap-fuzz-targets --example seed_corpus`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let corpus = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus"),
        PathBuf::from,
    );
    let written = hotswap_fuzz_targets::seeds::write_all(&corpus)?;
    println!("wrote {written} seeds under {}", corpus.display());
    Ok(())
}
