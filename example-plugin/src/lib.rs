//! The example plugin: the whole keepwarm idea in one file.
//!
//! Run it with `make run`, call `square 10`, then edit [`VERSION`] (or any
//! code), rebuild with `cargo build -p example-plugin`, and call again: the
//! new code answers and `square` is still cached.
//!
//! Each function is ordinary Rust. `#[export]` makes it callable by
//! `keepwarm call` (JSON arguments and result); `#[memo]` keeps its results in
//! a host cache named after it, which survives every reload.
//!
//! ```
//! // Outside a host the functions still compute (nothing is cached, so keep
//! // fib small here; inside a host fib(90) takes 91 cached steps):
//! assert_eq!(example_plugin::fib(30), Ok(832040));
//! assert!(example_plugin::fib(94).is_err()); // past u64: an error, not a wrapped number
//! assert_eq!(example_plugin::count_primes(100), Ok(25));
//! ```

use keepwarm_api::{export, log, memo};

/// Edit me, rebuild, and `call version` shows the new code.
pub const VERSION: &str = "v1";

/// `version()`: the plugin's [`VERSION`].
#[export]
pub fn version() -> &'static str {
    VERSION
}

/// `square(x)`: `x * x`, memoized in the cache `square`; a miss logs
/// `Squaring x`.
#[export]
#[memo(max_entries = 100_000)]
pub fn square(x: u64) -> Result<u64, String> {
    log!("Squaring {x}");
    x.checked_mul(x)
        .ok_or_else(|| format!("square({x}) overflows u64: x must be below 2^32"))
}

/// `fib(n)`: the n-th Fibonacci number, memoized recursively in the cache
/// `fib`: on a cold cache each n is computed once (`fib(90)`: 91 misses).
#[export]
#[memo(max_entries = 1_000)]
pub fn fib(n: u64) -> Result<u64, String> {
    match n {
        0 | 1 => Ok(n),
        94.. => Err(format!("fib({n}) overflows u64: n must be at most 93")),
        _ => Ok(fib(n - 1)? + fib(n - 2)?),
    }
}

/// `count_primes(n)`: the number of primes below `n`, by a sieve of
/// Eratosthenes, memoized in the cache `count_primes`. It reports its
/// progress (`keepwarm status` shows it; `keepwarm call` draws a bar on a
/// terminal): try `count_primes 400000000`.
#[export]
#[memo(max_entries = 1_000)]
pub fn count_primes(n: u64) -> Result<u64, String> {
    if n > 1 << 32 {
        return Err(format!("count_primes({n}): n must be at most 2^32"));
    }
    let n = n as usize;
    if n < 3 {
        return Ok(0);
    }
    let mut composite = vec![false; n];
    let mut count = 0;
    keepwarm_api::progress(0, n as u64);
    for i in 2..n {
        if i % (1 << 20) == 0 {
            keepwarm_api::progress(i as u64, n as u64);
        }
        if !composite[i] {
            count += 1;
            let mut j = i * i;
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    Ok(count)
}

keepwarm_api::plugin!(name: "example");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_without_a_host() {
        assert_eq!(square(10), Ok(100));
        assert!(square(1 << 32).is_err());
        assert_eq!(fib(25), Ok(75025));
        assert!(fib(94).is_err());
        assert_eq!(count_primes(100), Ok(25));
        assert_eq!(count_primes(2), Ok(0));
        assert_eq!(count_primes(3), Ok(1));
        assert!(count_primes(1 << 40).is_err());
        assert_eq!(version(), VERSION);
    }
}
