#[keepwarm_api::export(nmae = "sq")]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {}
