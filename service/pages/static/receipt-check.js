// Checks a receipt in the browser with nothing but the log's public key:
// the entry hashes to its leaf (RFC 9162 2.1.1), the inclusion proof leads
// from that leaf to a root (RFC 9162 2.1.3.2), and a checkpoint signed with
// the log's Ed25519 key (C2SP signed-note) commits to that root and size.
// service/audit/receipts.py runs the same checks on the server, for browsers
// without JavaScript or without Ed25519 in Web Crypto.
"use strict";

(function () {
  const encoder = new TextEncoder();

  function hex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function fromHex(text) {
    if (!/^([0-9a-f]{2})*$/i.test(text)) throw new Error("not hexadecimal: " + text.slice(0, 20));
    return Uint8Array.from(text.match(/../g) || [], (h) => parseInt(h, 16));
  }
  function fromBase64(text) {
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }
  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }
  function equal(a, b) {
    return a.length === b.length && a.every((x, i) => x === b[i]);
  }
  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }
  const nodeHash = (left, right) => sha256(concat(Uint8Array.of(1), left, right));

  async function rootFromInclusion(index, size, leaf, proof) {
    if (!(index >= 0 && index < size)) throw new Error("leaf " + index + " is not in a tree of size " + size);
    let fn = index, sn = size - 1, r = leaf;
    for (const p of proof) {
      if (sn === 0) throw new Error("the inclusion proof is too long");
      if (fn % 2 === 1 || fn === sn) {
        r = await nodeHash(p, r);
        if (fn % 2 === 0) {
          while (fn !== 0 && fn % 2 === 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
        }
      } else {
        r = await nodeHash(r, p);
      }
      fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
    }
    if (sn !== 0) throw new Error("the inclusion proof is too short");
    return r;
  }

  // A vkey is name+keyid(hex)+base64(0x01 || 32-byte Ed25519 key).
  async function parseVkey(vkey) {
    const first = vkey.indexOf("+"), second = vkey.indexOf("+", first + 1);  // base64 may itself hold "+"
    if (first < 1 || second < 0) throw new Error("the log key is not a vkey (name+id+key)");
    const name = vkey.slice(0, first), id = vkey.slice(first + 1, second), key = vkey.slice(second + 1);
    const raw = fromBase64(key);
    if (raw.length !== 33 || raw[0] !== 1) throw new Error("the log key is not an Ed25519 vkey");
    const expected = (await sha256(concat(encoder.encode(name + "\n"), raw))).slice(0, 4);
    if (hex(expected) !== id) throw new Error("the log key's id does not match it");
    const key32 = raw.slice(1);
    return { name, id: expected, key: await crypto.subtle.importKey("raw", key32, { name: "Ed25519" }, false, ["verify"]) };
  }

  async function checkSignature(note, keys) {
    const cut = note.lastIndexOf("\n\n");
    if (cut < 0) throw new Error("the checkpoint has no signature lines");
    const text = note.slice(0, cut + 1);
    const lines = note.slice(cut + 2).split("\n").filter((l) => l);
    let good = 0;
    for (const line of lines) {
      const m = /^\u2014 (\S+) (\S+)$/.exec(line);
      if (!m) throw new Error("a malformed signature line");
      const sig = fromBase64(m[2]);
      for (const k of keys) {
        if (k.name === m[1] && equal(sig.slice(0, 4), k.id)) {
          if (!(await crypto.subtle.verify({ name: "Ed25519" }, k.key, sig.slice(4), encoder.encode(text)))) {
            throw new Error("the signature by " + k.name + " does not verify");
          }
          good += 1;
        }
      }
    }
    if (good === 0) throw new Error("no signature by the log's key");
    return text;
  }

  async function check(receiptText, origin, vkeys) {
    const done = [];
    let receipt;
    try {
      receipt = JSON.parse(receiptText);
    } catch (e) {
      return [[false, "this is not a receipt as the ledger gives them (not JSON)"]];
    }
    if (typeof receipt.entry !== "string" || !receipt.proof || typeof receipt.checkpoint !== "string") {
      return [[false, "this is not a receipt as the ledger gives them (no entry, proof or checkpoint)"]];
    }
    const leaf = await sha256(concat(Uint8Array.of(0), encoder.encode(receipt.entry)));
    if (hex(leaf) !== String(receipt.leaf_hash).toLowerCase()) {
      return [[false, "the entry's bytes do not hash to the receipt's leaf hash: the entry was changed"]];
    }
    done.push([true, "the entry hashes to leaf " + hex(leaf).slice(0, 16) + "…"]);
    const proof = receipt.proof;
    let root;
    try {
      root = await rootFromInclusion(proof.leaf_index, proof.tree_size, leaf, proof.hashes.map(fromHex));
    } catch (e) {
      return done.concat([[false, "the inclusion proof is malformed: " + e.message]]);
    }
    done.push([true, "the proof leads from entry " + (proof.leaf_index + 1) + " to a root of a " +
      proof.tree_size.toLocaleString("en-GB") + "-entry log"]);
    let body;
    try {
      body = await checkSignature(receipt.checkpoint, await Promise.all(vkeys.map(parseVkey)));
    } catch (e) {
      if (e.name === "NotSupportedError") throw e;  // no Ed25519 here: the server checks instead
      return done.concat([[false, "the checkpoint is not signed by this log's key: " + e.message]]);
    }
    const [cpOrigin, cpSize, cpRoot] = body.split("\n");
    if (cpOrigin !== origin) return done.concat([[false, "the checkpoint is from another log (" + cpOrigin + ")"]]);
    done.push([true, "the checkpoint is signed by " + origin + "'s key"]);
    if (Number(cpSize) !== proof.tree_size || !equal(fromBase64(cpRoot), root)) {
      return done.concat([[false, "the signed checkpoint commits to another log than the proof leads to"]]);
    }
    done.push([true, "the signed checkpoint commits to that root at size " + Number(cpSize).toLocaleString("en-GB")]);
    return done;
  }

  function show(result, checks) {
    const passed = checks.every(([ok]) => ok);
    const box = document.createElement("div");
    box.className = "ledger-result " + (passed ? "ledger-result--good" : "ledger-result--bad");
    box.dataset.checkedIn = "browser";
    const title = document.createElement("h3");
    title.textContent = passed ? "The receipt checks out (checked in this browser)" :
      "The receipt does not check out (checked in this browser)";
    const list = document.createElement("ul");
    list.className = "nhsuk-list";
    for (const [ok, detail] of checks) {
      const item = document.createElement("li");
      item.textContent = (ok ? "✓ " : "✗ ") + detail;
      list.append(item);
    }
    box.append(title, list);
    result.replaceChildren(box);
  }

  for (const form of document.querySelectorAll("form[data-receipt-check]")) {
    form.addEventListener("submit", async (event) => {
      if (!(window.crypto && crypto.subtle)) return;  // let the server check it
      event.preventDefault();
      const result = form.parentElement.querySelector("#receipt-result");
      try {
        const checks = await check(form.elements.receipt.value.trim(), form.dataset.origin,
          form.dataset.vkeys.split(" ").filter((k) => k));
        show(result, checks);
      } catch (e) {
        form.submit();  // Ed25519 (or Web Crypto) is missing here: the server checks it instead
      }
    });
  }
})();
