fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let r = btm_trainer::bench::run(&a[0], a[1] == "moe", a[2].parse().unwrap(), a[3].parse().unwrap()).unwrap();
    println!("{}", serde_json::to_string(&r).unwrap());
}
