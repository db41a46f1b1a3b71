//! Prints every Parley CRD as multi-document YAML on stdout.
//! `cargo run -p parley-crds --bin crdgen > crds/generated/crds.yaml`

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = parley_crds::crds_yaml()?;
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(())
}
