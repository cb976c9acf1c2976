//! Plain-text tables for the client commands.

/// `rows` under `headers`, columns left-aligned and two spaces apart, no trailing spaces.
/// Control characters in cells (values come from the network) print as `?`.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |cell: &str| -> String {
        cell.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let lines: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| clean(h)).collect())
        .chain(rows.iter().map(|r| r.iter().map(|c| clean(c)).collect()))
        .collect();
    let mut widths = vec![0; headers.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (cell, w) in line.iter().zip(&widths) {
            text.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        let row = |cells: &[&str]| cells.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        for (rows, expected) in [
            (vec![], "A  BB\n"),
            (vec![row(&["x", ""])], "A  BB\nx\n"),
            (
                vec![row(&["long", "y"]), row(&["é", "zzz"])],
                "A     BB\nlong  y\né     zzz\n",
            ),
            (
                vec![row(&["a\x1b[31m", "b\nc"])],
                "A       BB\na?[31m  b?c\n",
            ),
            // Short rows leave the last columns empty.
            (vec![row(&["only"])], "A     BB\nonly\n"),
        ] {
            assert_eq!(render(&["A", "BB"], &rows), expected);
        }
    }
}
