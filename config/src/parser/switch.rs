//! `switch` blocks.

use super::*;

impl FileParser<'_> {
    pub(super) fn switch(&mut self, at: Location) -> Result<()> {
        let (name, name_at) = self.value("switch name")?;
        // Same rules as VM names; only the noun differs.
        validate_name(&name)
            .map_err(|m| err(name_at.clone(), m.replacen("VM name", "switch name", 1)))?;
        if let Some(prev) = self.st.switch_at.get(&name) {
            return Err(err(
                name_at,
                format!("duplicate switch \"{name}\" (first defined at {prev})"),
            ));
        }
        let mut iface: Option<String> = None;
        let mut sw = SwitchDef {
            name: name.clone(),
            interface: String::new(),
            group: None,
            locked_lladdr: false,
            rdomain: None,
            up: true,
            enabled: true,
            defined_at: at.clone(),
        };
        let mut seen = HashSet::new();
        self.block("switch block", |p, kw, kat| {
            let mut once = |key: &'static str| {
                if seen.insert(key) {
                    Ok(())
                } else {
                    Err(err(kat.clone(), format!("{key} specified more than once")))
                }
            };
            match kw {
                "interface" => {
                    once("interface")?;
                    let (s, iat) = p.value("bridge interface name")?;
                    check_ifname(&s, iat)?;
                    iface = Some(s);
                }
                "group" => {
                    once("group")?;
                    let (s, gat) = p.value("group name")?;
                    check_group(&s, gat.clone())?;
                    p.st.cfg.group_refs.push((s.clone(), gat));
                    sw.group = Some(s);
                }
                "locked" => {
                    p.expect_word("lladdr", "locked")?;
                    sw.locked_lladdr = true;
                }
                "rdomain" => {
                    once("rdomain")?;
                    sw.rdomain = Some(p.number("rdomain", 0, 255)?);
                }
                "up" => sw.up = true,
                "down" => sw.up = false,
                "enable" => sw.enabled = true,
                "disable" => sw.enabled = false,
                _ => return Err(p.unknown(kw, kat.clone(), "in switch block", SWITCH_KEYWORDS)),
            }
            Ok(())
        })?;
        let Some(iface) = iface else {
            return Err(err(name_at, format!("switch \"{name}\" has no interface")));
        };
        sw.interface = iface;
        self.st.switch_at.insert(name, at);
        self.st.cfg.switches.push(sw);
        Ok(())
    }
}
