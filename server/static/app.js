// The demo page: list the models, send the chosen image as the raw request body, draw the top-5 as bars.
// Paths are relative to the page, so it works as well behind a reverse proxy that serves the gateway under a prefix.
const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// The request ID is what an operator finds the request by in the gateway's logs.
async function errorText(response) {
  const id = response.headers.get("X-Request-ID");
  const quoted = id ? ` (request ID ${id})` : "";
  try {
    const body = await response.json();
    return (body.error ? `${body.error.code}: ${body.error.message}` : response.statusText) + quoted;
  } catch {
    return `${response.status} ${response.statusText}${quoted}`;
  }
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    showStatus(`cannot list models: ${await errorText(response)}`, true);
    return;
  }
  const { models } = await response.json();
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (v${m.versions[0]}, ${m.num_classes} classes)`, m.name)));
  showStatus(models.length ? "Ready." : "The gateway serves no models.", !models.length);
}

function render(predictions) {
  const rows = predictions.map((p) => {
    const item = document.createElement("li");
    item.className = "prediction";
    const label = Object.assign(document.createElement("span"), { className: "label", textContent: p.label, title: `class ${p.index}` });
    const bar = Object.assign(document.createElement("span"), { className: "bar" });
    const fill = document.createElement("span");
    fill.style.width = `${(p.score * 100).toFixed(1)}%`;
    bar.append(fill);
    const score = Object.assign(document.createElement("span"), { className: "score", textContent: `${(p.score * 100).toFixed(1)}%` });
    item.append(label, bar, score);
    return item;
  });
  $("predictions").replaceChildren(...rows);
}

async function classify(file) {
  if (!file) return;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.classList.add("shown");
  $("predictions").replaceChildren();
  showStatus(`Classifying ${file.name}...`);
  const started = performance.now();
  const model = encodeURIComponent($("model").value);
  const response = await fetch(`v1/models/${model}/classify?top_k=5`, {
    method: "POST",
    headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
    body: file,
  });
  if (!response.ok) {
    showStatus(await errorText(response), true);
    return;
  }
  const result = await response.json();
  render(result.predictions);
  showStatus(`${result.model} v${result.version}: ${(performance.now() - started).toFixed(0)} ms`);
}

const drop = $("drop");
$("file").addEventListener("change", (event) => classify(event.target.files[0]));
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (event) => classify(event.dataTransfer.files[0]));
$("api-key").addEventListener("change", loadModels);
loadModels();
