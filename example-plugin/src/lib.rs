//! The example plugin: the whole keepwarm idea in one file.
//!
//! Run it with `make run`, call `square 10`, then edit [`VERSION`] (or any
//! code), rebuild with `cargo build -p example-plugin`, and call again: the
//! new code answers and `square` is still cached.
//!
//! ```
//! // Outside a host the functions still compute (nothing is cached, so keep
//! // fib small here; inside a host fib(90) takes 91 cached steps):
//! let args = keepwarm_api::Args::from_json("fib", b"[30]").unwrap();
//! assert_eq!(example_plugin::fib(&args).unwrap(), 832040u64);
//! ```

use keepwarm_api::{cached, log, Args, Error};

/// Edit me, rebuild, and `call version` shows the new code.
pub const VERSION: &str = "v1";

/// `version()`: the plugin's [`VERSION`].
pub fn version(args: &Args) -> Result<&'static str, Error> {
    args.expect_len(0)?;
    Ok(VERSION)
}

/// `square(x)`: `x * x`, memoized in the cache `square`; a miss logs
/// `Squaring x`.
pub fn square(args: &Args) -> Result<u64, Error> {
    args.expect_len(1)?;
    let x: u64 = args.get(0)?;
    let checked = cached("square", &x, || {
        log!("Squaring {x}");
        x.checked_mul(x)
    });
    checked.ok_or_else(|| Error::new(format!("square({x}) overflows u64")))
}

/// `fib(n)`: the n-th Fibonacci number, memoized recursively in the cache
/// `fib` (each n is computed once on a cold cache).
pub fn fib(args: &Args) -> Result<u64, Error> {
    args.expect_len(1)?;
    let n: u64 = args.get(0)?;
    if n > 93 {
        return Err(Error::new(format!(
            "fib({n}) overflows u64; n must be <= 93"
        )));
    }
    Ok(fib_memo(n))
}

fn fib_memo(n: u64) -> u64 {
    cached("fib", &n, || {
        if n < 2 {
            n
        } else {
            fib_memo(n - 1) + fib_memo(n - 2)
        }
    })
}

/// `count_primes(n)`: the number of primes below `n`, by a sieve, memoized in
/// the cache `count_primes`.
pub fn count_primes(args: &Args) -> Result<u64, Error> {
    args.expect_len(1)?;
    let n: u64 = args.get(0)?;
    if n > 1 << 32 {
        return Err(Error::new(format!("count_primes({n}): n must be <= 2^32")));
    }
    Ok(cached("count_primes", &n, || sieve(n as usize)))
}

fn sieve(n: usize) -> u64 {
    if n < 3 {
        return 0;
    }
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            let mut j = i * i;
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    count
}

keepwarm_api::plugin! {
    name: "example",
    functions: [version, square, fib, count_primes],
    caches: [
        keepwarm_api::cache("square").max_entries(100_000),
        keepwarm_api::cache("fib").max_entries(1_000),
        keepwarm_api::cache("count_primes").max_entries(1_000),
    ],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<T>(
        f: fn(&Args) -> Result<T, Error>,
        name: &'static str,
        json: &str,
    ) -> Result<T, Error> {
        f(&Args::from_json(name, json.as_bytes()).unwrap())
    }

    #[test]
    fn computes_without_a_host() {
        assert_eq!(call(square, "square", "[10]").unwrap(), 100);
        assert_eq!(call(fib, "fib", "[25]").unwrap(), 75025);
        assert!(call(fib, "fib", "[94]").is_err());
        assert_eq!(call(count_primes, "count_primes", "[100]").unwrap(), 25);
        assert_eq!(call(count_primes, "count_primes", "[2]").unwrap(), 0);
        assert_eq!(call(count_primes, "count_primes", "[3]").unwrap(), 1);
        assert!(call(square, "square", "[\"x\"]").is_err());
        assert!(call(square, "square", "[]").is_err());
    }
}
