// Two relay-only RTCPeerConnections in a real browser, a data channel carrying bytes each way.
//   node webrtc.mjs '<json config>'   -> one JSON line per scenario on stdout
// Config: {browser: "chrome"|"firefox", executable, userDataDir, home, args, prefs, url,
//          scenarios: [{name, iceServers, bytes, timeoutMs}]}
import puppeteer from 'puppeteer-core';

const cfg = JSON.parse(process.argv[2]);

// Runs inside the page. No crypto.subtle (the page is not a secure context): both ends
// generate the same pseudo-random stream from a seed and compare byte for byte.
async function scenario(sc) {
  const started = performance.now();
  const errors = [];
  const stream = (seed) => {
    let x = seed >>> 0 || 1;
    return (n) => {
      const out = new Uint8Array(n);
      for (let i = 0; i < n; i++) {
        x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
        out[i] = x & 0xff;
      }
      return out;
    };
  };
  const timeout = (ms, what) => new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms));
  const conf = {iceServers: sc.iceServers, iceTransportPolicy: 'relay'};
  const a = new RTCPeerConnection(conf);
  const b = new RTCPeerConnection(conf);
  const candidates = {a: [], b: []};
  for (const [name, pc, other] of [['a', a, b], ['b', b, a]]) {
    pc.onicecandidate = (e) => {
      if (e.candidate && e.candidate.candidate) {
        candidates[name].push(e.candidate.candidate);
        other.addIceCandidate(e.candidate).catch((err) => errors.push(String(err)));
      }
    };
    pc.onicecandidateerror = (e) => errors.push(
      `${name}: ${e.errorCode} ${e.errorText || ''} ${e.url || ''}`.trim());
  }
  const result = {name: sc.name, connected: false, errors, candidates};
  try {
    const dcA = a.createDataChannel('bulk', {ordered: true});
    dcA.binaryType = 'arraybuffer';
    const gotB = new Promise((resolve) => { b.ondatachannel = (e) => resolve(e.channel); });
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const opened = (dc) => dc.readyState === 'open' ? Promise.resolve()
      : new Promise((resolve) => { dc.onopen = () => resolve(); });
    // Give up early when gathering ends without any relay candidate on one side.
    const noRelay = new Promise((_, reject) => {
      const check = () => {
        if (a.iceGatheringState === 'complete' && candidates.a.length === 0)
          reject(new Error('ICE gathering completed without a relay candidate'));
      };
      a.onicegatheringstatechange = check;
    });
    const dcB = await Promise.race([gotB, noRelay, timeout(sc.timeoutMs, 'data channel')]);
    dcB.binaryType = 'arraybuffer';
    await Promise.race([Promise.all([opened(dcA), opened(dcB)]), timeout(sc.timeoutMs, 'open')]);
    result.connected = true;
    result.connectMs = Math.round(performance.now() - started);

    const transfer = (tx, rx, seed) => new Promise((resolve, reject) => {
      const expect = stream(seed);
      let received = 0, bad = -1;
      rx.onmessage = (e) => {
        const got = new Uint8Array(e.data);
        const want = expect(got.length);
        for (let i = 0; i < got.length && bad < 0; i++) if (got[i] !== want[i]) bad = received + i;
        received += got.length;
        if (received >= sc.bytes) resolve({received, firstMismatch: bad});
      };
      const gen = stream(seed);
      let sent = 0;
      const chunk = 16384;
      tx.bufferedAmountLowThreshold = 256 * 1024;
      const pump = () => {
        while (sent < sc.bytes && tx.bufferedAmount < 1024 * 1024) {
          const n = Math.min(chunk, sc.bytes - sent);
          tx.send(gen(n));
          sent += n;
        }
      };
      tx.onbufferedamountlow = pump;
      try { pump(); } catch (err) { reject(err); }
    });
    const t = performance.now();
    const [ab, ba] = await Promise.race([
      Promise.all([transfer(dcA, dcB, 0x1234567), transfer(dcB, dcA, 0x7654321)]),
      timeout(sc.timeoutMs * 3, 'transfer')]);
    result.transferMs = Math.round(performance.now() - t);
    result.aToB = ab;
    result.bToA = ba;

    const stats = await a.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) stats.forEach((s) => {
      if (s.type === 'candidate-pair' && (s.selected || (s.nominated && s.state === 'succeeded'))) pair = s;
    });
    if (pair) {
      const local = stats.get(pair.localCandidateId);
      result.local = {type: local.candidateType, relayProtocol: local.relayProtocol,
                      protocol: local.protocol, address: local.address || local.ip,
                      url: local.url};
    }
  } catch (err) {
    result.error = String(err && err.message || err);
  } finally {
    a.close();
    b.close();
  }
  result.totalMs = Math.round(performance.now() - started);
  return result;
}

const launch = {
  browser: cfg.browser,
  executablePath: cfg.executable,
  headless: true,
  userDataDir: cfg.userDataDir,
  args: cfg.args || [],
  env: {...process.env, HOME: cfg.home},
  timeout: 30000,
  protocolTimeout: 120000,
};
if (cfg.browser === 'firefox') launch.extraPrefsFirefox = cfg.prefs || {};
const browser = await puppeteer.launch(launch);
try {
  const version = await browser.version();
  for (const sc of cfg.scenarios) {
    const page = await browser.newPage();
    page.on('console', (m) => process.stderr.write(`console: ${m.text()}\n`));
    await page.goto(cfg.url, {waitUntil: 'load', timeout: 15000});
    const r = await page.evaluate(scenario, sc);
    r.browserVersion = version;
    process.stdout.write(JSON.stringify(r) + '\n');
    await page.close();
  }
} finally {
  await browser.close();
}
