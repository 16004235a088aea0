// The clip-pacl page: plain DOM calls over the JSON API. Server data is only ever set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TABS = ["search", "classify", "segment"];

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function say(id, text, isError = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// One tab shown at a time, chosen by the URL's #fragment (so a link or a reload opens the same tab).
function showTab() {
  const wanted = location.hash.slice(1);
  const current = TABS.includes(wanted) ? wanted : TABS[0];
  for (const name of TABS) {
    $(`tab-${name}`).setAttribute("aria-selected", String(name === current));
    $(`${name}-section`).hidden = name !== current;
  }
}

// fetch + JSON; a non-2xx answer becomes an Error carrying the server's one-line message. Every request
// carries X-Requested-With: the server refuses POSTs without it (a cross-site page cannot add it).
async function api(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { ...options, headers: { "X-Requested-With": "clip-pacl" } });
  } catch (err) {
    throw new Error(`the server did not answer (${err.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: report the status below */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

// Runs `work` with the form's button disabled. A failure is reported under the form, and the tab's previous
// result (`output`) is hidden so that it cannot be mistaken for the answer to this request.
async function busy(form, messageId, output, work) {
  const button = form.querySelector("button");
  button.disabled = true;
  say(messageId, "working…");
  try {
    await work();
    output.hidden = false;
  } catch (err) {
    output.hidden = true;
    say(messageId, `Error: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// FormData of a form without its empty fields (so optional numbers are absent, not "").
function formData(form) {
  const data = new FormData(form);
  for (const [key, value] of [...data.entries()]) {
    if (value === "" || (value instanceof File && value.size === 0 && !value.name)) data.delete(key);
  }
  return data;
}

// The chosen file as a data: URL (the page's CSP allows data: images), to show next to its result.
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

// The text an index row carries (from a table's caption column, a shard's .txt), if any.
function captionOf(hit) {
  const metadata = hit.metadata || {};
  const text = metadata.caption ?? metadata.text ?? metadata.title;
  return text === undefined || text === null ? "" : String(text);
}

function showResults(results, what) {
  const grid = $("results");
  grid.replaceChildren(...results.map((hit) => {
    const caption = captionOf(hit);
    return el("figure", { className: "hit", title: caption ? `${hit.path}\n${caption}` : hit.path }, [
      el("img", { src: hit.thumbnail, alt: caption || baseName(hit.path) }),
      el("figcaption", {}, [
        el("span", { className: "name", textContent: baseName(hit.path) }),
        el("span", { className: "score", textContent: hit.score.toFixed(3) }),
        ...(caption ? [el("span", { className: "caption", textContent: caption })] : []),
      ]),
    ]);
  }));
  say("search-message", results.length ? `${results.length} best matches for ${what}` : "no results");
}

async function searchText(query, k) {
  const params = new URLSearchParams({ q: query, k: String(k) });
  const body = await api(`/api/search?${params}`);
  history.replaceState(null, "", `?${params}${location.hash}`);
  showResults(body.results, `“${query}”`);
}

function bar(value, color) {
  const node = el("div", { className: "bar" });
  node.style.width = `${(100 * value).toFixed(1)}%`;  // CSSOM, which the page's CSP allows (style attributes it would not)
  if (color) node.style.background = color;
  return node;
}

// A horizontal bar chart as a table: one row per [label, value in 0..1, colour or null], with an optional swatch.
function bars(table, rows, withSwatch = false) {
  table.replaceChildren(...rows.map(([label, value, color]) => {
    const cells = [
      el("td", { className: "label", textContent: label }),
      el("td", { className: "bar-cell" }, [bar(value, color)]),
      el("td", { className: "value", textContent: `${(100 * value).toFixed(1)} %` }),
    ];
    if (withSwatch) {
      const swatch = el("span", { className: color ? "swatch" : "swatch none" });
      if (color) swatch.style.background = color;
      cells.unshift(el("td", { className: "swatch-cell" }, [swatch]));
    }
    return el("tr", {}, cells);
  }));
}

function setUpSearch(health) {
  if (!health.index) {
    $("search-section").classList.add("disabled");
    for (const node of $("search-section").querySelectorAll("input, button")) node.disabled = true;
    say("search-message", "No image index loaded: start the server with --index IDX to search.");
    return;
  }
  const output = $("results");
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.target, "search-message", output, () => searchText($("search-query").value, $("search-k").value));
  });
  $("image-search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = formData(event.target);
    data.set("k", $("search-k").value);
    busy(event.target, "search-message", output, async () => {
      const body = await api("/api/search", { method: "POST", body: data });
      showResults(body.results, `the example image ${$("search-image").files[0].name}`);
    });
  });
  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    $("search-query").value = params.get("q");
    if (params.get("k")) $("search-k").value = params.get("k");
    busy($("search-form"), "search-message", output,
         () => searchText($("search-query").value, $("search-k").value));
  }
}

function setUpClassify() {
  $("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.target, "classify-message", $("classify-result"), async () => {
      const body = await api("/api/classify", { method: "POST", body: formData(event.target) });
      $("classify-preview").src = await readAsDataURL($("classify-image").files[0]);
      bars($("classify-results"), body.predictions.map((p) => [p.label, p.probability, null]));
      say("classify-message", `${body.labels.length} labels, ${body.num_templates} prompt templates each`);
    });
  });
}

function setUpSegment(health) {
  const select = $("segment-method");
  for (const method of health.segment_methods) {
    select.append(el("option", { value: method, textContent: method }));
  }
  select.options[0].textContent = `default (${health.default_segment_method || "none"})`;
  $("segment-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.target, "segment-message", $("segment-result"), async () => {
      const body = await api("/api/segment", { method: "POST", body: formData(event.target) });
      $("segment-overlay").src = body.overlay;
      const rows = body.labels.map((label) => [label, body.fractions[label], body.colors[label]]);
      rows.sort((a, b) => b[1] - a[1]);
      if (body.unassigned > 0) rows.push(["(unassigned, not tinted)", body.unassigned, null]);
      bars($("segment-legend"), rows, true);
      say("segment-message", `method ${body.method}, ${body.size[0]}×${body.size[1]} pixels`);
    });
  });
}

// What the model was trained on, as the server read it from the model's training record.
function trainedOn(record) {
  if (!record || !record.data) return "training data not recorded";
  const details = [record.steps ? `${record.steps} ${record.unit || "steps"}` : null,
                   record.objective ? `objective ${record.objective}` : null,
                   record.from ? `from ${record.from}` : null].filter(Boolean);
  return `trained on ${record.data}` + (details.length ? ` (${details.join(", ")})` : "");
}

async function main() {
  showTab();
  window.addEventListener("hashchange", showTab);
  // A bug in this script must show up on the page, not leave it silently half-working.
  window.addEventListener("error", (event) => say("status", `page error: ${event.message}`, true));
  window.addEventListener("unhandledrejection", (event) => say("status", `page error: ${event.reason}`, true));
  let health;
  try {
    health = await api("/api/health");
  } catch (err) {
    say("status", `server not reachable: ${err.message}`, true);
    return;
  }
  let index = health.index ? `${health.index.count} indexed images` : "no index";
  if (health.index && health.index.searched_with === "base CLIP") index += " (searched with the base CLIP)";
  say("status", `model ${health.model || health.model_type} (${health.embed_dim}-d, ${health.image_size}px, ` +
                `${health.device}) · ${trainedOn(health.trained_on)} · ${index} · ` +
                `uploads up to ${health.max_upload_mb} MB`);
  setUpSearch(health);
  setUpClassify();
  setUpSegment(health);
}

main();
