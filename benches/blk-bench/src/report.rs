//! Tables from result lines: min/median/max per label and workload, then the
//! subject's median IOPS as a ratio of every other label's.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::workload::{Sample, Workload};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

type Groups = BTreeMap<(String, String), Vec<Sample>>;

fn group(text: &str) -> (Vec<String>, Groups) {
    let mut labels: Vec<String> = Vec::new();
    let mut groups = Groups::new();
    for s in text.lines().filter_map(Sample::from_line) {
        if !labels.contains(&s.label) {
            labels.push(s.label.clone());
        }
        groups
            .entry((s.workload.clone(), s.label.clone()))
            .or_default()
            .push(s);
    }
    (labels, groups)
}

fn median_iops(groups: &Groups, workload: &str, label: &str) -> Option<f64> {
    let g = groups.get(&(workload.to_string(), label.to_string()))?;
    Some(median(&mut g.iter().map(|s| s.iops).collect::<Vec<_>>()))
}

/// A grouped bar chart of median IOPS per workload, relative to the first
/// label's (usually host fio, the limit).
pub fn svg(text: &str) -> String {
    let (labels, groups) = group(text);
    let colors = ["#888888", "#d9822b", "#2b7bd9", "#3aa655"];
    let (width, height, left, bar) = (820.0, 360.0, 40.0, 40.0);
    let floor = height - 60.0;
    let slot = (width - left) / Workload::all().len() as f64;
    let first = labels.first().cloned().unwrap_or_default();
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' \
         font-family='sans-serif' font-size='11'>\n\
         <text x='{left}' y='18' font-size='13'>median IOPS relative to {first}</text>\n"
    );
    for (i, w) in Workload::all().iter().enumerate() {
        let x0 = left + i as f64 * slot;
        for (j, l) in labels.iter().enumerate() {
            let (Some(v), Some(base)) = (
                median_iops(&groups, w.name, l),
                median_iops(&groups, w.name, &first),
            ) else {
                continue;
            };
            let r = v / base;
            let (x, bh) = (x0 + j as f64 * bar, (floor - 40.0) * (r / 1.5).min(1.0));
            let color = colors[j % colors.len()];
            out += &format!(
                "<rect x='{x:.0}' y='{:.0}' width='{}' height='{bh:.0}' fill='{color}'/>\n\
                 <text x='{x:.0}' y='{:.0}'>{r:.2}</text>\n",
                floor - bh,
                bar - 4.0,
                floor - bh - 4.0
            );
        }
        out += &format!("<text x='{x0:.0}' y='{}'>{}</text>\n", floor + 16.0, w.name);
    }
    for (j, l) in labels.iter().enumerate() {
        let x = left + j as f64 * 200.0;
        let color = colors[j % colors.len()];
        out += &format!(
            "<rect x='{x}' y='{}' width='10' height='10' fill='{color}'/>\n\
             <text x='{}' y='{}'>{l}</text>\n",
            height - 20.0,
            x + 14.0,
            height - 11.0
        );
    }
    out + "</svg>\n"
}

/// Renders the tables for the samples in `text`: one row per label and
/// workload, then a ratio table for each of `subjects`.
pub fn render(text: &str, subjects: &[String]) -> String {
    let (labels, groups) = group(text);
    let order: Vec<&str> = Workload::all().iter().map(|w| w.name).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<22} {:>26} {:>9} {:>9} {:>9} {:>10}",
        "workload", "label", "IOPS min/median/max", "MB/s", "p50 us", "p99 us", "cpu s/Mio"
    );
    let mut med_iops: BTreeMap<(String, String), f64> = BTreeMap::new();
    for w in &order {
        for l in &labels {
            let Some(g) = groups.get(&(w.to_string(), l.clone())) else {
                continue;
            };
            let mut iops: Vec<f64> = g.iter().map(|s| s.iops).collect();
            let (min, max) = (
                iops.iter().copied().fold(f64::MAX, f64::min),
                iops.iter().copied().fold(0.0, f64::max),
            );
            let med = median(&mut iops);
            let mb = median(&mut g.iter().map(|s| s.mbps).collect::<Vec<_>>());
            let p50 = median(&mut g.iter().map(|s| s.p50_us).collect::<Vec<_>>());
            let p99 = median(&mut g.iter().map(|s| s.p99_us).collect::<Vec<_>>());
            let cpu = median(&mut g.iter().map(|s| s.cpu_s_per_mio).collect::<Vec<_>>());
            med_iops.insert((w.to_string(), l.clone()), med);
            let _ = writeln!(
                out,
                "{:<20} {:<22} {:>26} {:>9.1} {:>9.1} {:>9.1} {:>10.2}",
                w,
                l,
                format!("{min:.0}/{med:.0}/{max:.0}"),
                mb,
                p50,
                p99,
                cpu
            );
        }
    }
    for subject in subjects {
        let others: Vec<&String> = labels.iter().filter(|l| *l != subject).collect();
        let _ = writeln!(out, "\nmedian IOPS of {subject} relative to:");
        let _ = write!(out, "{:<20}", "workload");
        for o in &others {
            let _ = write!(out, " {:>22}", o);
        }
        let _ = writeln!(out);
        for w in &order {
            let Some(mine) = med_iops.get(&(w.to_string(), subject.to_string())) else {
                continue;
            };
            let _ = write!(out, "{:<20}", w);
            for o in &others {
                let cell = med_iops
                    .get(&(w.to_string(), o.to_string()))
                    .map_or("-".to_string(), |theirs| format!("{:.2}x", mine / theirs));
                let _ = write!(out, " {:>22}", cell);
            }
            let _ = writeln!(out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_bar_per_label_and_workload() {
        let text = "a\trandread-4k-qd32\t100\t0\t0\t0\t0\nb\trandread-4k-qd32\t50\t0\t0\t0\t0\n";

        let svg = svg(text);

        assert_eq!(svg.matches("<rect").count(), 2 + 2);
        assert!(svg.contains(">0.50<"));
    }

    #[test]
    fn ratio_uses_median_iops() {
        let text = "a\trandread-4k-qd32\t100\t0\t0\t0\t0\na\trandread-4k-qd32\t300\t0\t0\t0\t0\na\trandread-4k-qd32\t200\t0\t0\t0\t0\nb\trandread-4k-qd32\t100\t0\t0\t0\t0\n";

        let table = render(text, &["a".to_string(), "b".to_string()]);

        assert!(table.contains("100/200/300"));
        assert!(table.contains("2.00x"));
        assert!(table.contains("0.50x"));
    }
}
