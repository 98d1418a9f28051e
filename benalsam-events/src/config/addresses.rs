//! Which of a setting's addresses (a list of brokers) a connection goes to: the next
//! connection starts with the address after the one last used, so a node that went away is
//! tried again only once the others have been. With one address this is that address again.

/// The rotation over a setting's addresses, by index (the connector wraps it around).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Addresses {
    /// Which address the next connection tries first.
    next: usize,
    /// Which one the link is open to.
    current: Option<usize>,
}

impl Addresses {
    /// The address the next connection tries first.
    pub(crate) fn next(&self) -> usize {
        self.next
    }

    /// A connection reached `index`: the next attempt, should this one fail to set up, goes
    /// on to the address after it.
    pub(crate) fn reached(&mut self, index: usize) {
        self.next = index + 1;
    }

    /// The link is open to `index`.
    pub(crate) fn connected(&mut self, index: usize) {
        self.current = Some(index);
    }

    /// The link was lost: the next connection starts with the address after its own.
    pub(crate) fn advance(&mut self) {
        if let Some(index) = self.current.take() {
            self.next = index + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_link_moves_on_to_the_address_after_its_own() {
        let mut a = Addresses::default();
        assert_eq!(a.next(), 0);
        a.connected(1);
        assert_eq!(a.next(), 0, "connecting alone does not move on");
        a.advance();
        assert_eq!(a.next(), 2);
        // Lost again before a new link: nothing more to move past.
        a.advance();
        assert_eq!(a.next(), 2);
    }

    #[test]
    fn an_address_reached_but_not_set_up_is_passed() {
        let mut a = Addresses::default();
        a.reached(2);
        assert_eq!(a.next(), 3);
        a.connected(2);
        a.advance();
        assert_eq!(a.next(), 3);
    }
}
