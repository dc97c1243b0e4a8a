//! A plugin written against keepwarm's lower layer: no `#[memo]`, no
//! `#[export]`. Each function takes the call's JSON arguments ([`Args`]),
//! and `square` talks to the host cache by hand with `host_cache_get` and
//! `host_cache_put`, choosing its own key and value encoding (little-endian
//! bytes). This is what the attributes generate for you; it stays here so
//! both layers stay tested.

use keepwarm_api::{host_cache_get, host_cache_put, log, Args, Error};

/// `square(x)`: x*x, cached by hand in the host cache `raw_square`.
fn square(args: &Args) -> Result<u64, Error> {
    args.expect_len(1)?;
    let x: u64 = args.get(0)?;
    let key = x.to_le_bytes();
    if let Some(hit) = host_cache_get("raw_square", &key) {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*hit) {
            return Ok(u64::from_le_bytes(bytes));
        }
    }
    log!("raw: squaring {x}");
    let value = x
        .checked_mul(x)
        .ok_or_else(|| Error::new(format!("square({x}) overflows u64")))?;
    host_cache_put("raw_square", &key, &value.to_le_bytes())?;
    Ok(value)
}

/// `version()`: which plugin this is.
fn version(args: &Args) -> Result<&'static str, Error> {
    args.expect_len(0)?;
    Ok("raw-abi")
}

keepwarm_api::plugin! {
    name: "raw-abi",
    functions: [square, version],
    caches: [keepwarm_api::cache("raw_square").max_entries(1_000).max_bytes(16_000)],
}
