//! The checked-in C header must match what cbindgen generates from
//! `plugin-api/abi/src/lib.rs`. Regenerate with `make header` (or
//! `KEEPWARM_BLESS=1 cargo test -p keepwarm-abi --test header`).

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("../include/keepwarm.h");
    if std::env::var_os("KEEPWARM_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "plugin-api/include/keepwarm.h is out of date with plugin-api/abi/src/lib.rs; run `make header` and commit it"
    );
}
