struct Calculator;

impl Calculator {
    #[keepwarm_api::memo]
    fn square(&self, x: u64) -> u64 {
        x * x
    }
}

fn main() {}
