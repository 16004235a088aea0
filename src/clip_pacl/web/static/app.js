// The clip-pacl page: plain DOM calls over the JSON API. Server data is only ever set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

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

// fetch + JSON; a non-2xx answer becomes an Error carrying the server's one-line message. Every request
// carries X-Requested-With: the server refuses POSTs without it (a cross-site page cannot add it).
async function api(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { "X-Requested-With": "clip-pacl" } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: report the status below */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

// Runs `work` with the form's button disabled, reporting errors under the form.
async function busy(form, messageId, work) {
  const button = form.querySelector("button");
  button.disabled = true;
  say(messageId, "working…");
  try {
    await work();
  } catch (err) {
    say(messageId, err.message, true);
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

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

function showResults(results, what) {
  const grid = $("results");
  grid.replaceChildren(...results.map((hit) => el("figure", { className: "hit", title: hit.path }, [
    el("img", { src: hit.thumbnail, alt: baseName(hit.path), loading: "lazy" }),
    el("figcaption", {}, [
      el("span", { className: "name", textContent: baseName(hit.path) }),
      el("span", { className: "score", textContent: hit.score.toFixed(3) }),
    ]),
  ])));
  say("search-message", results.length ? `${results.length} best matches for ${what}` : "no results");
}

async function searchText(query, k) {
  const params = new URLSearchParams({ q: query, k: String(k) });
  const body = await api(`/api/search?${params}`);
  history.replaceState(null, "", `?${params}`);
  showResults(body.results, `“${query}”`);
}

function bar(value) {
  const node = el("div", { className: "bar" });
  node.style.width = `${(100 * value).toFixed(1)}%`;  // CSSOM, which the page's CSP allows (style attributes it would not)
  return node;
}

function bars(table, rows) {
  table.replaceChildren(...rows.map(([label, value]) => el("tr", {}, [
    el("td", { textContent: label }),
    el("td", { className: "bar-cell" }, [bar(value)]),
    el("td", { className: "value", textContent: `${(100 * value).toFixed(1)} %` }),
  ])));
}

function setUpSearch(health) {
  if (!health.index) {
    $("search-section").classList.add("disabled");
    for (const node of $("search-section").querySelectorAll("input, button")) node.disabled = true;
    say("search-message", "No image index loaded: start the server with --index IDX to search.");
    return;
  }
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.target, "search-message", () => searchText($("search-query").value, $("search-k").value));
  });
  $("image-search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = formData(event.target);
    data.set("k", $("search-k").value);
    busy(event.target, "search-message", async () => {
      const body = await api("/api/search", { method: "POST", body: data });
      showResults(body.results, "the example image");
    });
  });
  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    $("search-query").value = params.get("q");
    if (params.get("k")) $("search-k").value = params.get("k");
    busy($("search-form"), "search-message", () => searchText($("search-query").value, $("search-k").value));
  }
}

function setUpClassify() {
  $("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.target, "classify-message", async () => {
      const body = await api("/api/classify", { method: "POST", body: formData(event.target) });
      bars($("classify-results"), body.predictions.map((p) => [p.label, p.probability]));
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
    busy(event.target, "segment-message", async () => {
      const body = await api("/api/segment", { method: "POST", body: formData(event.target) });
      $("segment-overlay").src = body.overlay;
      const rows = Object.entries(body.fractions).sort((a, b) => b[1] - a[1]);
      if (body.unassigned > 0) rows.push(["(unassigned)", body.unassigned]);
      bars($("segment-fractions"), rows);
      $("segment-result").hidden = false;
      say("segment-message", `method ${body.method}, ${body.size[0]}×${body.size[1]} pixels`);
    });
  });
}

async function main() {
  let health;
  try {
    health = await api("/api/health");
  } catch (err) {
    say("status", `server not reachable: ${err.message}`, true);
    return;
  }
  const index = health.index ? `${health.index.count} indexed images` : "no index";
  say("status", `model ${health.model || health.model_type} (${health.embed_dim}-d, ${health.image_size}px, ` +
                `${health.device}) · ${index} · uploads up to ${health.max_upload_mb} MB`);
  setUpSearch(health);
  setUpClassify();
  setUpSegment(health);
}

main();
