//! Writes the seed corpus: `seeds/<target>/<name>` for every seed of
//! `rangekv_fuzz::seeds::all()`. Run from anywhere: `cargo run --example gen_seeds`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for seed in rangekv_fuzz::seeds::all() {
        let dir = root.join(seed.target);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(seed.name);
        std::fs::write(&path, &seed.bytes)?;
        println!("{} ({} bytes)", path.display(), seed.bytes.len());
    }
    Ok(())
}
