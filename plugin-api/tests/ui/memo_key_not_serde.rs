struct Opaque;

#[keepwarm_api::memo]
fn describe(o: Opaque) -> u64 {
    let _ = o;
    1
}

fn main() {}
