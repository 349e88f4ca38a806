//! The kitchen's rules, pure: how an order's lines become one reservation,
//! and what a cook ticket may do next.
//!
//! ```text
//!   order placed ──all lines in stock──▶ COOKING ──complete──▶ COOKED
//!        │ any line short                   │ cancel (stock restored)
//!        ▼                                  ▼
//!     REJECTED (nothing reserved)        CANCELLED
//! ```

use std::collections::BTreeMap;

use restaurant_contract::{OrderLine, Shortage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CookStatus {
    Cooking,
    Cooked,
    Rejected,
    Cancelled,
}

impl CookStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CookStatus::Cooking => "COOKING",
            CookStatus::Cooked => "COOKED",
            CookStatus::Rejected => "REJECTED",
            CookStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "COOKING" => CookStatus::Cooking,
            "COOKED" => CookStatus::Cooked,
            "REJECTED" => CookStatus::Rejected,
            "CANCELLED" => CookStatus::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: String,
    pub order_id: String,
    pub restaurant_id: String,
    pub items: Vec<OrderLine>,
    pub address: String,
    pub status: CookStatus,
    pub reason: Option<String>,
    pub complete_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The order's lines merged per menu item and sorted by menu id. Sorting
/// fixes the order in which stock rows are locked, so two reservations
/// can never deadlock each other on PostgreSQL.
pub fn reservation_plan(items: &[OrderLine]) -> Vec<(String, i64)> {
    let mut merged: BTreeMap<&str, i64> = BTreeMap::new();
    for l in items {
        *merged.entry(&l.menu_id).or_default() += l.qty;
    }
    merged.into_iter().map(|(m, q)| (m.to_owned(), q)).collect()
}

/// Takes `plan` out of one restaurant's `stock` (menu id → units), every
/// line or none; on a shortage, `stock` is untouched and the shortages say
/// what was asked and what there was (`None`: not on the menu).
pub fn reserve_all(
    stock: &mut BTreeMap<String, i64>,
    plan: &[(String, i64)],
) -> Result<(), Vec<Shortage>> {
    let shortages: Vec<Shortage> = plan
        .iter()
        .filter_map(|(menu_id, qty)| {
            let available = stock.get(menu_id).copied();
            available.is_none_or(|a| a < *qty).then(|| Shortage {
                menu_id: menu_id.clone(),
                requested: *qty,
                available,
            })
        })
        .collect();
    if !shortages.is_empty() {
        return Err(shortages);
    }
    for (menu_id, qty) in plan {
        *stock.get_mut(menu_id).expect("checked above") -= qty;
    }
    Ok(())
}

/// The customer-facing reason for a rejection.
pub fn shortage_reason(shortages: &[Shortage]) -> String {
    let parts: Vec<String> = shortages
        .iter()
        .map(|s| match s.available {
            None => format!("{} is not on the menu", s.menu_id),
            Some(a) => format!("{} (requested {}, available {a})", s.menu_id, s.requested),
        })
        .collect();
    format!("out of stock: {}", parts.join(", "))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cooking stops and the reserved stock goes back.
    Cancel,
    AlreadyCancelled,
    /// The ticket was rejected: nothing was reserved, nothing to undo.
    NothingReserved,
    /// The dish is cooked: too late.
    TooLate,
}

pub fn cancel_outcome(status: CookStatus) -> CancelOutcome {
    match status {
        CookStatus::Cooking => CancelOutcome::Cancel,
        CookStatus::Cancelled => CancelOutcome::AlreadyCancelled,
        CookStatus::Rejected => CancelOutcome::NothingReserved,
        CookStatus::Cooked => CancelOutcome::TooLate,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    Complete,
    AlreadyCooked,
    NotCooking,
}

pub fn complete_outcome(status: CookStatus) -> CompleteOutcome {
    match status {
        CookStatus::Cooking => CompleteOutcome::Complete,
        CookStatus::Cooked => CompleteOutcome::AlreadyCooked,
        CookStatus::Rejected | CookStatus::Cancelled => CompleteOutcome::NotCooking,
    }
}

/// A menu item as an administrator sets it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuItem {
    pub name: String,
    pub price: i64,
    pub stock: i64,
}

pub const MAX_STOCK: i64 = 1_000_000_000;

impl MenuItem {
    pub fn parse(name: &str, price: i64, stock: i64) -> Result<Self, String> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 128 {
            return Err("name must be 1 to 128 characters".into());
        }
        if !(0..=MAX_STOCK).contains(&price) {
            return Err(format!("price must be between 0 and {MAX_STOCK}"));
        }
        if !(0..=MAX_STOCK).contains(&stock) {
            return Err(format!("stock must be between 0 and {MAX_STOCK}"));
        }
        Ok(MenuItem {
            name: name.to_owned(),
            price,
            stock,
        })
    }
}

/// Ids in paths: non-empty, bounded, no surprises in logs.
pub fn check_id(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
        return Err(format!("{field} must be 1 to 128 printable characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(m: &str, q: i64) -> OrderLine {
        OrderLine {
            menu_id: m.into(),
            qty: q,
        }
    }

    #[test]
    fn plan_merges_lines_and_sorts_by_menu() {
        let plan = reservation_plan(&[line("b", 1), line("a", 2), line("b", 3)]);
        assert_eq!(plan, vec![("a".into(), 2), ("b".into(), 4)]);
    }

    #[test]
    fn tickets_cancel_only_while_cooking() {
        assert_eq!(cancel_outcome(CookStatus::Cooking), CancelOutcome::Cancel);
        assert_eq!(cancel_outcome(CookStatus::Cooked), CancelOutcome::TooLate);
        assert_eq!(
            cancel_outcome(CookStatus::Cancelled),
            CancelOutcome::AlreadyCancelled
        );
        assert_eq!(
            cancel_outcome(CookStatus::Rejected),
            CancelOutcome::NothingReserved
        );
        assert_eq!(
            complete_outcome(CookStatus::Cooking),
            CompleteOutcome::Complete
        );
        assert_eq!(
            complete_outcome(CookStatus::Cooked),
            CompleteOutcome::AlreadyCooked
        );
        assert_eq!(
            complete_outcome(CookStatus::Cancelled),
            CompleteOutcome::NotCooking
        );
        for s in [
            CookStatus::Cooking,
            CookStatus::Cooked,
            CookStatus::Rejected,
            CookStatus::Cancelled,
        ] {
            assert_eq!(CookStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn shortages_read_well() {
        let r = shortage_reason(&[
            Shortage {
                menu_id: "kimchi".into(),
                requested: 3,
                available: Some(1),
            },
            Shortage {
                menu_id: "pizza".into(),
                requested: 1,
                available: None,
            },
        ]);
        assert_eq!(
            r,
            "out of stock: kimchi (requested 3, available 1), pizza is not on the menu"
        );
    }

    #[test]
    fn menu_items_are_validated() {
        assert!(MenuItem::parse("Bibimbap", 12000, 10).is_ok());
        assert!(MenuItem::parse(" ", 1, 1).is_err());
        assert!(MenuItem::parse("x", -1, 1).is_err());
        assert!(MenuItem::parse("x", 1, -1).is_err());
        assert!(MenuItem::parse("x", 1, MAX_STOCK + 1).is_err());
    }

    #[test]
    fn reserve_all_takes_every_line_or_none() {
        let mut stock: BTreeMap<String, i64> = [("a".to_owned(), 3), ("b".to_owned(), 1)]
            .into_iter()
            .collect();
        assert_eq!(
            reserve_all(&mut stock, &[("a".into(), 2), ("b".into(), 1)]),
            Ok(())
        );
        assert_eq!((stock["a"], stock["b"]), (1, 0));
        let short = reserve_all(
            &mut stock,
            &[("a".into(), 1), ("b".into(), 1), ("z".into(), 1)],
        )
        .unwrap_err();
        assert_eq!((stock["a"], stock["b"]), (1, 0), "a shortage takes nothing");
        let got: Vec<_> = short
            .iter()
            .map(|s| (s.menu_id.as_str(), s.available))
            .collect();
        assert_eq!(got, [("b", Some(0)), ("z", None)]);
    }
}
