//! Prints the compact unwind table leaktrace derives from an object's `.eh_frame`:
//! `cargo run -p leaktrace --example unwind_table -- /usr/bin/python3.11 [0xADDR…]`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: unwind_table OBJECT [0xADDR...]"))?,
    );
    let (t, took) = leaktrace::unwind::build_file(&path)?;
    let pages = t.pages();
    println!(
        "{}: {} FDEs -> {} rows ({} unsupported), {} pages, {} KiB, built in {:.1} ms",
        path.display(),
        t.fdes,
        t.rows.len(),
        t.unsupported,
        pages.len(),
        (t.rows.len() * 8 + pages.len() * 4) / 1024,
        took.as_secs_f64() * 1e3
    );
    let widest = pages.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!("most rows within one page: {widest}");
    for a in args {
        let pc = u64::from_str_radix(a.trim_start_matches("0x"), 16)?;
        println!("{pc:#x}: {:?}", t.lookup(pc));
    }
    Ok(())
}
