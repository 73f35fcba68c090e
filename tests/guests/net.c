/*
 * net.c - freestanding virtio-net driver for vmd's network tests.
 *
 * Finds the first virtio-net function (1af4:1041) on PCI bus 0, drives it
 * through the modern transport with VERSION_1 and MAC only (no offloads),
 * a receive and a transmit queue of QS entries, polling the used rings
 * with interrupts suppressed.  Everything after the ring-3 switch runs at
 * CPL3 with an I/O bitmap allowing every port: the nested KVM here
 * emulates CPL0 code at ~1M instructions/s but runs CPL3 natively.
 *
 * Command line (tokens we do not know are ignored):
 *   net.nic=N           drive the Nth virtio-net function (default 0)
 *   net.ip=A.B.C.D/NN   static address
 *   net.ip6=X:X:X:X:X:X:X:X  static IPv6 address (all 8 groups, hex):
 *                       answers neighbor solicitations and ICMPv6 echo
 *   net.dhcp=1          DISCOVER, OFFER, REQUEST, ACK; prints
 *                       "VMD-TEST net lease A.B.C.D/NN router R"
 *   net.forge=1         send every frame from a forged source MAC
 *   net.ping=A.B.C.D    ARP for it, then net.count=N (default 3) echo
 *                       requests; "VMD-TEST net ping A.B.C.D ok R/N" (R > 0)
 *                       or "... fail 0/N"
 *   net.exit=N          power off once N echo requests were answered
 *                       (and our own ping, if any, is done)
 *   net.timeout=S       power off after S seconds whatever (default 60)
 *   net.tsc_khz=K       count seconds on the TSC at K kHz instead of the
 *                       CMOS RTC (Firecracker has none)
 *   net.bench=tx:N      send N 1514-byte UDP frames to net.peer=A.B.C.D
 *                       port net.port=P (default 9) as fast as possible:
 *                       "VMD-TEST net bench tx frames N bytes B cycles C tsc_khz K"
 *   net.bench=rx        count what arrives; every second
 *                       "VMD-TEST net bench rx frames F bytes B cycles C tsc_khz K"
 *                       (C: TSC since the first frame)
 * Once addressed: "VMD-TEST net ready <ip> <mac>", then it answers ARP
 * requests for its address and ICMP echo requests.  Last line:
 * "VMD-TEST net done answered=N".  Errors: "VMD-TEST error: <what>".
 * Time comes from the CMOS RTC's seconds register.
 */
#include "lib.h"
#include "pci.h"
#include "ring3.h"
#include "virtio.h"

/* ---- time: RTC seconds ---- */

static u8 rtc_sec(void)
{
	outb(0x70, 0);
	return inb(0x71);
}

static u8 last_sec;
static u32 elapsed;		/* seconds since start */
static u64 opt_tsc_khz;		/* net.tsc_khz=: seconds from the TSC */
static u64 tsc_start;

/* Cheap enough to call often: reads the RTC every 16384th call. */
static int tick(void)
{
	static u32 n;
	if (++n & 0x3fff)
		return 0;
	if (opt_tsc_khz) {
		u32 e = (u32)((rdtsc() - tsc_start) / (opt_tsc_khz * 1000));
		if (e == elapsed)
			return 0;
		elapsed = e;
		return 1;
	}
	u8 s = rtc_sec();
	if (s != last_sec) {
		last_sec = s;
		elapsed++;
		return 1;
	}
	return 0;
}

/* ---- PCI / virtio ---- */

#define QS		64
#define BUFSZ		2048
#define VHDR		12
#define F_MAC		(1ULL << 5)
#define RX_RING		0x300000UL
#define TX_RING		0x310000UL
#define RX_BUF		0x400000UL
#define TX_BUF		0x440000UL

struct vq { u64 ring; u16 avail, used_seen; u64 notify; };

static struct virtio_caps vc;
static struct vq rxq, txq;
static u8 mac[6], src_mac[6];
static int rx_dirty;

static volatile u16 *avail_of(struct vq *q) { return (volatile u16 *)(q->ring + 0x1000); }
static volatile u16 *used_of(struct vq *q) { return (volatile u16 *)(q->ring + 0x2000); }
static struct desc *desc_of(struct vq *q) { return (struct desc *)q->ring; }

static void setup_queue(struct vq *q, u16 index, u64 ring)
{
	u64 c = vc.common;
	q->ring = ring;
	q->notify = vc.notify + (u64)virtio_queue(c, index, QS, ring) * vc.mult;
	avail_of(q)[0] = 1;	/* VRING_AVAIL_F_NO_INTERRUPT: we poll */
	wr16(c + 0x1c, 1);
}

static void net_init(int slot)
{
	pci_wr(slot, 0x04, (pci_rd(slot, 0x04) & 0xffff) | 0x6);
	virtio_caps(slot, &vc, 0);
	if (!vc.common || !vc.notify || !vc.device)
		fail("virtio capabilities missing");
	u64 c = vc.common;
	u64 f = virtio_start(c, 0);
	if (!(f & F_MAC))
		fail("no VIRTIO_NET_F_MAC");
	virtio_features_ok(c, f & (F_MAC | F_VERSION_1));
	for (int i = 0; i < 6; i++)
		mac[i] = rd8(vc.device + (u64)i);
	setup_queue(&rxq, 0, RX_RING);
	setup_queue(&txq, 1, TX_RING);
	struct desc *d = desc_of(&rxq);
	volatile u16 *av = avail_of(&rxq);
	for (u16 i = 0; i < QS; i++) {
		d[i] = (struct desc){ RX_BUF + (u64)i * BUFSZ, BUFSZ, DESC_WRITE, 0 };
		av[2 + i] = i;
	}
	rxq.avail = QS;
	barrier();
	av[1] = QS;
	wr8(c + 0x14, 1 | 2 | 4 | 8);
	wr16(rxq.notify, 0);
}

/* Next received frame, or 0. */
static u8 *rx_next(u32 *len, u16 *id)
{
	volatile u16 *u = used_of(&rxq);
	if (u[1] == rxq.used_seen)
		return 0;
	barrier();
	volatile u32 *e = (volatile u32 *)(rxq.ring + 0x2000 + 4 + 8 * (u64)(rxq.used_seen % QS));
	u32 i = e[0], l = e[1];
	rxq.used_seen++;
	*id = (u16)i;
	if (i >= QS || l < VHDR + 14) {
		*len = 0;
		return 0;
	}
	*len = l - VHDR;
	return (u8 *)(RX_BUF + (u64)i * BUFSZ + VHDR);
}

static void rx_recycle(u16 id)
{
	volatile u16 *av = avail_of(&rxq);
	av[2 + rxq.avail % QS] = id;
	barrier();
	rxq.avail++;
	av[1] = rxq.avail;
	rx_dirty = 1;
}

static void rx_kick(void)
{
	if (rx_dirty) {
		rx_dirty = 0;
		wr16(rxq.notify, 0);
	}
}

static u16 tx_pending;	/* committed but not yet notified */

static void tx_flush(void)
{
	if (tx_pending) {
		tx_pending = 0;
		wr16(txq.notify, 1);
	}
}

/* The frame area of the next free transmit slot (its header zeroed). */
static u8 *tx_buf(void)
{
	volatile u16 *u = used_of(&txq);
	if ((u16)(txq.avail - u[1]) >= QS) {
		tx_flush();
		while ((u16)(txq.avail - u[1]) >= QS)
			;
	}
	u8 *b = (u8 *)(TX_BUF + (u64)(txq.avail % QS) * BUFSZ);
	memset(b, 0, VHDR);
	return b + VHDR;
}

/* Sends the frame in the slot tx_buf returned; notifies every `batch`. */
static void tx_commit(u32 len, u16 batch)
{
	u16 slot = txq.avail % QS;
	desc_of(&txq)[slot] = (struct desc){ TX_BUF + (u64)slot * BUFSZ, VHDR + len, 0, 0 };
	volatile u16 *av = avail_of(&txq);
	av[2 + slot] = slot;
	barrier();
	txq.avail++;
	av[1] = txq.avail;
	if (++tx_pending >= batch)
		tx_flush();
}

/* ---- protocols ---- */

static u32 my_ip, my_mask_len, peer_ip, router;
static u8 peer_mac[6];
static int have_ip, have_peer_mac;
static u64 answered;
static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

static u16 csum(const u8 *p, u32 n)
{
	u32 s = 0;
	for (; n > 1; n -= 2, p += 2)
		s += (u32)(p[0] << 8 | p[1]);
	if (n)
		s += (u32)p[0] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

static void put_ip(u32 a)
{
	for (int i = 3; i >= 0; i--) {
		put_dec((a >> (8 * i)) & 0xff);
		if (i)
			putc('.');
	}
}

static void put_mac(const u8 *m)
{
	const char *x = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		putc(x[m[i] >> 4]);
		putc(x[m[i] & 15]);
		if (i < 5)
			putc(':');
	}
}

static u8 *eth(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, src_mac, 6);
	put16(f + 12, type);
	return f + 14;
}

static void send_arp(u16 op, const u8 *tha, u32 tpa)
{
	u8 *f = tx_buf();
	u8 *a = eth(f, op == 1 ? bcast : tha, 0x0806);
	put16(a, 1);
	put16(a + 2, 0x0800);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, src_mac, 6);
	put32(a + 14, my_ip);
	memcpy(a + 18, op == 1 ? (const u8 *)"\0\0\0\0\0\0" : tha, 6);
	put32(a + 24, tpa);
	memset(a + 28, 0, 18);	/* pad to 60 bytes */
	tx_commit(60, 1);
}

/* An IPv4 header at `ip` for `payload` bytes; returns the payload. */
static u8 *ipv4(u8 *ip, u8 proto, u32 src, u32 dst, u32 payload)
{
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(20 + payload));
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, src);
	put32(ip + 16, dst);
	put16(ip + 10, csum(ip, 20));
	return ip + 20;
}

static u16 ping_id = 0x7654, ping_seq;
static u32 ping_replies;

static void send_echo(u32 dst, const u8 *dmac)
{
	u8 *f = tx_buf();
	u8 *icmp = ipv4(eth(f, dmac, 0x0800), 1, my_ip, dst, 64);
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, ping_id);
	put16(icmp + 6, ++ping_seq);
	for (int i = 8; i < 64; i++)
		icmp[i] = (u8)i;
	put16(icmp + 2, csum(icmp, 64));
	tx_commit(14 + 20 + 64, 1);
}

/* An echo reply for the request `f` (IP header at f+14). */
static void answer_echo(const u8 *f, u32 len)
{
	const u8 *ip = f + 14;
	u32 ihl = (ip[0] & 15) * 4u, tot = get16(ip + 2);
	if (ihl < 20 || tot < ihl + 8 || 14 + tot > len || 14 + tot > BUFSZ - VHDR)
		return;
	u8 *r = tx_buf();
	memcpy(r, f, 14 + tot);
	eth(r, f + 6, 0x0800);
	u8 *rip = r + 14;
	put32(rip + 12, get32(ip + 16));
	put32(rip + 16, get32(ip + 12));
	rip[8] = 64;
	put16(rip + 10, 0);
	put16(rip + 10, csum(rip, ihl));
	u8 *icmp = rip + ihl;
	icmp[0] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 2, csum(icmp, tot - ihl));
	tx_commit(14 + tot, 1);
	answered++;
}

/* ---- DHCP client ---- */

#define DHCP_XID 0x564d4421u
static int dhcp_state;	/* 0 off, 1 discovering, 2 requesting, 3 bound */
static u32 offer_ip, offer_server;

static void send_dhcp(int type)
{
	u8 *f = tx_buf();
	u8 *ip = eth(f, bcast, 0x0800);
	u32 blen = 236 + 4 + 3 + 6 + 6 + 4 + 1;
	u8 *udp = ipv4(ip, 17, 0, 0xffffffffu, 8 + blen);
	put16(udp, 68);
	put16(udp + 2, 67);
	put16(udp + 4, (u16)(8 + blen));
	put16(udp + 6, 0);
	u8 *b = udp + 8;
	memset(b, 0, blen);
	b[0] = 1;
	b[1] = 1;
	b[2] = 6;
	put32(b + 4, DHCP_XID);
	put16(b + 10, 0x8000);
	memcpy(b + 28, mac, 6);
	u8 *o = b + 236;
	o[0] = 99; o[1] = 130; o[2] = 83; o[3] = 99;
	o += 4;
	*o++ = 53; *o++ = 1; *o++ = (u8)type;
	if (type == 3) {
		*o++ = 50; *o++ = 4; put32(o, offer_ip); o += 4;
		*o++ = 54; *o++ = 4; put32(o, offer_server); o += 4;
	}
	*o++ = 55; *o++ = 2; *o++ = 1; *o++ = 3;
	*o++ = 255;
	tx_commit(14 + 20 + 8 + blen, 1);
}

static void dhcp_input(const u8 *udp, u32 ulen)
{
	const u8 *b = udp + 8;
	if (ulen < 8 + 240 || b[0] != 2 || get32(b + 4) != DHCP_XID || memcmp(b + 28, mac, 6))
		return;
	if (get32(b + 236) != 0x63825363u)
		return;
	int type = 0;
	u32 mask = 0, rtr = 0, server = 0;
	for (u32 i = 240; i + 1 < ulen - 8;) {
		u8 code = b[i];
		if (code == 0) { i++; continue; }
		if (code == 255) break;
		u8 l = b[i + 1];
		if (i + 2 + l > ulen - 8) break;
		const u8 *v = b + i + 2;
		if (code == 53 && l >= 1) type = v[0];
		if (code == 1 && l >= 4) mask = get32(v);
		if (code == 3 && l >= 4) rtr = get32(v);
		if (code == 54 && l >= 4) server = get32(v);
		i += 2u + l;
	}
	if (dhcp_state == 1 && type == 2) {
		offer_ip = get32(b + 16);
		offer_server = server;
		dhcp_state = 2;
		send_dhcp(3);
	} else if (dhcp_state == 2 && type == 5) {
		my_ip = get32(b + 16);
		my_mask_len = 0;
		while (my_mask_len < 32 && (mask << my_mask_len) & 0x80000000u)
			my_mask_len++;
		router = rtr;
		dhcp_state = 3;
		have_ip = 1;
		puts("VMD-TEST net lease ");
		put_ip(my_ip);
		putc('/');
		put_dec(my_mask_len);
		puts(" router ");
		put_ip(router);
		putc('\n');
	} else if (dhcp_state == 2 && type == 6) {
		dhcp_state = 1;
		send_dhcp(1);
	}
}

/* ---- IPv6: neighbor discovery and echo, for a static address ---- */

static u8 my_ip6[16];
static int have_ip6;

/* The ICMPv6 checksum over the pseudo-header and `n` bytes at `icmp`. */
static u16 csum6(const u8 *src, const u8 *dst, const u8 *icmp, u32 n)
{
	u32 s = 0;
	for (int i = 0; i < 16; i += 2)
		s += (u32)(src[i] << 8 | src[i + 1]) + (u32)(dst[i] << 8 | dst[i + 1]);
	s += n + 58;
	for (u32 i = 0; i + 1 < n; i += 2)
		s += (u32)(icmp[i] << 8 | icmp[i + 1]);
	if (n & 1)
		s += (u32)icmp[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* Sends the ICMPv6 message of `n` bytes already at f+54 to `dst`/`dmac`. */
static void send6(u8 *f, const u8 *dmac, const u8 *dst, u32 n)
{
	u8 *ip = eth(f, dmac, 0x86dd);
	put32(ip, 0x60000000);
	put16(ip + 4, (u16)n);
	ip[6] = 58;
	ip[7] = 255;
	memcpy(ip + 8, my_ip6, 16);
	memcpy(ip + 24, dst, 16);
	u8 *icmp = ip + 40;
	put16(icmp + 2, 0);
	put16(icmp + 2, csum6(my_ip6, dst, icmp, n));
	tx_commit(14 + 40 + n, 1);
}

static void input6(const u8 *f, u32 len)
{
	const u8 *ip = f + 14;
	if (!have_ip6 || len < 14 + 40 + 8 || ip[6] != 58)
		return;
	u32 plen = get16(ip + 4);
	if (14 + 40 + plen > len || plen > BUFSZ - VHDR - 54)
		return;
	const u8 *src = ip + 8, *dst = ip + 24, *icmp = ip + 40;
	/* Ours, or the solicited-node multicast group of ours. */
	static const u8 snm[13] = { 0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff };
	int to_us = !memcmp(dst, my_ip6, 16) ||
		(!memcmp(dst, snm, 13) && !memcmp(dst + 13, my_ip6 + 13, 3));
	if (!to_us)
		return;
	if (icmp[0] == 135 && plen >= 24 && !memcmp(icmp + 8, my_ip6, 16)) {
		/* Neighbor solicitation for us: a solicited, overriding
		 * advertisement with our link-layer address. */
		u8 *r = tx_buf();
		u8 *na = r + 54;
		memset(na, 0, 32);
		na[0] = 136;
		put32(na + 4, 0x60000000);
		memcpy(na + 8, my_ip6, 16);
		na[24] = 2;
		na[25] = 1;
		memcpy(na + 26, src_mac, 6);
		send6(r, f + 6, src, 32);
	} else if (icmp[0] == 128 && !memcmp(dst, my_ip6, 16)) {
		u8 *r = tx_buf();
		memcpy(r + 54, icmp, plen);
		r[54] = 129;
		send6(r, f + 6, src, plen);
		answered++;
	}
}

/* ---- input ---- */

static int bench_rx;
static u64 rx_frames, rx_bytes, rx_t0;

static void input(const u8 *f, u32 len)
{
	if (bench_rx) {
		if (!rx_frames)
			rx_t0 = rdtsc();
		rx_frames++;
		rx_bytes += len;
	}
	if (memcmp(f, mac, 6) && memcmp(f, src_mac, 6) && memcmp(f, bcast, 6) &&
	    !(f[0] == 0x33 && f[1] == 0x33))
		return;
	u16 type = get16(f + 12);
	if (type == 0x86dd) {
		input6(f, len);
		return;
	}
	if (type == 0x0806 && len >= 42) {
		const u8 *a = f + 14;
		u16 op = get16(a + 6);
		u32 spa = get32(a + 14), tpa = get32(a + 24);
		if (peer_ip && spa == peer_ip) {
			memcpy(peer_mac, a + 8, 6);
			have_peer_mac = 1;
		}
		if (op == 1 && have_ip && tpa == my_ip)
			send_arp(2, a + 8, spa);
		return;
	}
	if (type != 0x0800 || len < 34)
		return;
	const u8 *ip = f + 14;
	u32 ihl = (ip[0] & 15) * 4u;
	if ((ip[0] >> 4) != 4 || ihl < 20 || len < 14 + ihl + 8)
		return;
	if (ip[9] == 17 && dhcp_state && get16(ip + ihl + 2) == 68) {
		u32 tot = get16(ip + 2);
		if (14 + tot <= len && tot > ihl)
			dhcp_input(ip + ihl, tot - ihl);
		return;
	}
	if (!have_ip || get32(ip + 16) != my_ip || ip[9] != 1)
		return;
	const u8 *icmp = ip + ihl;
	if (icmp[0] == 8)
		answer_echo(f, len);
	else if (icmp[0] == 0 && get16(icmp + 4) == ping_id && get16(icmp + 6) == ping_seq)
		ping_replies++;
}

/* Serves the receive ring once; returns the frames seen. */
static u32 poll_rx(void)
{
	u32 n = 0, len;
	for (;;) {
		volatile u16 *u = used_of(&rxq);
		if (u[1] == rxq.used_seen)
			break;
		u16 id = QS;
		u8 *f = rx_next(&len, &id);
		if (f)
			input(f, len);
		if (id < QS)
			rx_recycle(id);
		n++;
	}
	rx_kick();
	tx_flush();
	return n;
}

/* ---- command line ---- */

static const char *arg;

static int starts(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static u64 num(void)
{
	u64 v = 0;
	while (*arg >= '0' && *arg <= '9')
		v = v * 10 + (u64)(*arg++ - '0');
	return v;
}

static u32 ipaddr(void)
{
	u32 a = 0;
	for (int i = 0; i < 4; i++) {
		a = a << 8 | (u32)(num() & 0xff);
		if (*arg == '.')
			arg++;
	}
	return a;
}

static u32 opt_exit, opt_timeout = 60, opt_count = 3, opt_port = 9, opt_dhcp, opt_forge, opt_nic;
static u64 bench_tx;

static void parse(const char *cmd)
{
	arg = cmd;
	while (*arg) {
		while (*arg == ' ')
			arg++;
		const char *tok = arg;
		while (*arg && *arg != ' ')
			arg++;
		const char *end = arg;
#define OPT(o) (starts(tok, o) && (arg = tok + sizeof(o) - 1, 1))
		if (OPT("net.nic=")) {
			opt_nic = (u32)num();
		} else if (OPT("net.ip6=")) {
			for (int i = 0; i < 8; i++) {
				u32 g = 0;
				for (;;) {
					char c = *arg;
					u32 d = c >= '0' && c <= '9' ? (u32)(c - '0') :
						c >= 'a' && c <= 'f' ? (u32)(c - 'a' + 10) : 99;
					if (d == 99)
						break;
					g = g << 4 | d;
					arg++;
				}
				my_ip6[2 * i] = (u8)(g >> 8);
				my_ip6[2 * i + 1] = (u8)g;
				if (*arg == ':')
					arg++;
			}
			have_ip6 = 1;
		} else if (OPT("net.ip=")) {
			my_ip = ipaddr();
			my_mask_len = *arg == '/' ? (arg++, (u32)num()) : 24;
			have_ip = 1;
		} else if (OPT("net.dhcp=")) {
			opt_dhcp = (u32)num();
		} else if (OPT("net.forge=")) {
			opt_forge = (u32)num();
		} else if (OPT("net.ping=") || OPT("net.peer=")) {
			peer_ip = ipaddr();
		} else if (OPT("net.count=")) {
			opt_count = (u32)num();
		} else if (OPT("net.exit=")) {
			opt_exit = (u32)num();
		} else if (OPT("net.tsc_khz=")) {
			opt_tsc_khz = num();
		} else if (OPT("net.timeout=")) {
			opt_timeout = (u32)num();
		} else if (OPT("net.port=")) {
			opt_port = (u32)num();
		} else if (OPT("net.bench=rx")) {
			bench_rx = 1;
		} else if (OPT("net.bench=tx:")) {
			bench_tx = num();
		}
		arg = end;
	}
}

/* ---- main ---- */

static void done(void)
{
	tx_flush();
	puts("VMD-TEST net done answered=");
	put_dec(answered);
	putc('\n');
	/* From ring 3 a final hlt would fault: power off and wait. */
	outw(PM1A_CNT, SLP_S5);
	for (;;)
		(void)inb(COM1 + 5);
}

/* Serves the network until `cond` holds or the timeout passes. */
#define SERVE_UNTIL(cond) do {						\
	while (!(cond)) {						\
		poll_rx();						\
		if (tick() && elapsed >= opt_timeout)			\
			done();						\
	}								\
} while (0)

/* Waits about a second (one RTC change) while serving. */
static void serve_second(void)
{
	u32 e = elapsed;
	SERVE_UNTIL(elapsed != e);
}

static u64 tsc_khz(void)
{
	if (opt_tsc_khz)
		return opt_tsc_khz;
	u32 e = elapsed;
	SERVE_UNTIL(elapsed != e);
	u64 t0 = rdtsc();
	e = elapsed;
	SERVE_UNTIL(elapsed != e);
	return (rdtsc() - t0) / 1000;
}

static void resolve_peer(void)
{
	while (!have_peer_mac) {
		send_arp(1, 0, peer_ip);
		u32 e = elapsed;
		SERVE_UNTIL(have_peer_mac || elapsed != e);
	}
}

static void do_ping(void)
{
	resolve_peer();
	for (u32 i = 0; i < opt_count; i++) {
		u32 before = ping_replies;
		send_echo(peer_ip, peer_mac);
		u32 e = elapsed;
		SERVE_UNTIL(ping_replies != before || elapsed - e >= 2);
	}
	puts("VMD-TEST net ping ");
	put_ip(peer_ip);
	puts(ping_replies ? " ok " : " fail ");
	put_dec(ping_replies);
	putc('/');
	put_dec(opt_count);
	putc('\n');
}

static void do_bench_tx(void)
{
	resolve_peer();
	u64 khz = tsc_khz();
	/* Every slot holds the same frame: build them once. */
	u32 plen = 1500 - 20 - 8;
	for (u16 s = 0; s < QS; s++) {
		u8 *f = (u8 *)(TX_BUF + (u64)s * BUFSZ);
		memset(f, 0, VHDR);
		u8 *udp = ipv4(eth(f + VHDR, peer_mac, 0x0800), 17, my_ip, peer_ip, 8 + plen);
		put16(udp, 40000);
		put16(udp + 2, (u16)opt_port);
		put16(udp + 4, (u16)(8 + plen));
		put16(udp + 6, 0);
		for (u32 i = 0; i < plen; i++)
			udp[8 + i] = (u8)i;
	}
	volatile u16 *u = used_of(&txq);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < bench_tx; i++) {
		if ((u16)(txq.avail - u[1]) >= QS) {
			tx_flush();
			while ((u16)(txq.avail - u[1]) >= QS)
				;
		}
		tx_commit(1514, 16);
	}
	tx_flush();
	while (u[1] != txq.avail)
		;
	u64 t1 = rdtsc();
	puts("VMD-TEST net bench tx frames ");
	put_dec(bench_tx);
	puts(" bytes ");
	put_dec(bench_tx * 1514);
	puts(" cycles ");
	put_dec(t1 - t0);
	puts(" tsc_khz ");
	put_dec(khz);
	putc('\n');
}

static void do_bench_rx(void)
{
	u64 khz = tsc_khz();
	for (;;) {
		serve_second();
		puts("VMD-TEST net bench rx frames ");
		put_dec(rx_frames);
		puts(" bytes ");
		put_dec(rx_bytes);
		puts(" cycles ");
		put_dec(rx_frames ? rdtsc() - rx_t0 : 0);
		puts(" tsc_khz ");
		put_dec(khz);
		putc('\n');
	}
}

static const struct hvm_start_info *start;

static void __attribute__((noreturn, used)) user_main(void)
{
	if (start->magic == HVM_START_MAGIC && start->cmdline_paddr)
		parse((const char *)(usize)start->cmdline_paddr);
	int slot = -1;
	u32 seen = 0;
	for (int s = 0; s < 32 && slot < 0; s++)
		if (pci_rd(s, 0) == 0x10411af4u && seen++ == opt_nic)
			slot = s;
	if (slot < 0)
		fail("no virtio-net device");
	net_init(slot);
	memcpy(src_mac, mac, 6);
	if (opt_forge) {
		/* Another locally administered unicast address. */
		src_mac[0] = 0x02;
		src_mac[5] ^= 0x5a;
	}
	last_sec = rtc_sec();
	tsc_start = rdtsc();
	if (opt_dhcp) {
		have_ip = 0;
		dhcp_state = 1;
		while (dhcp_state != 3) {
			if (dhcp_state == 1)
				send_dhcp(1);
			else
				send_dhcp(3);
			u32 e = elapsed;
			SERVE_UNTIL(dhcp_state == 3 || elapsed - e >= 2);
		}
	}
	if (!have_ip)
		fail("no address: give net.ip= or net.dhcp=1");
	puts("VMD-TEST net ready ");
	put_ip(my_ip);
	putc(' ');
	put_mac(mac);
	putc('\n');
	if (bench_tx)
		do_bench_tx();
	if (bench_rx)
		do_bench_rx();
	if (peer_ip && !bench_tx)
		do_ping();
	if (opt_exit || peer_ip)
		SERVE_UNTIL(answered >= opt_exit);
	else
		SERVE_UNTIL(0);
	done();
	for (;;)
		;
}

void guest_main(u32 start_info)
{
	start = (const struct hvm_start_info *)(usize)start_info;
	serial_init();
	puts("VMD-TEST net start\n");
	pci_map_bars();
	enter_ring3(user_main);
}
