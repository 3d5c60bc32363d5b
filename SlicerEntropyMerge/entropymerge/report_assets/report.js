"use strict";
const report = JSON.parse(document.getElementById("report-data").textContent);
const VIEWS = Object.keys(report.views);
const settings = { overlay: true, opacity: report.opacity };

async function inflate(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// Draw slice `index` of `view` centred in a `box` px square: the scan with `labels`, or the entropy map.
function draw(canvas, view, index, box, image, labels, entropy) {
  const v = report.views[view], start = v.origin + index * v.slice_step;
  const zoom = Math.min(box / v.columns, box / (v.rows * v.aspect));
  canvas.parentElement.style.width = canvas.parentElement.style.height = `${box}px`;
  canvas.width = v.columns;
  canvas.height = v.rows;
  canvas.style.width = `${Math.round(v.columns * zoom)}px`;
  canvas.style.height = `${Math.round(v.rows * v.aspect * zoom)}px`;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(v.columns, v.rows);
  const out = pixels.data, a = settings.opacity;
  for (let row = 0, p = 0; row < v.rows; row++) {
    for (let column = 0; column < v.columns; column++, p += 4) {
      const voxel = start + row * v.row_step + column * v.column_step;
      let r, g, b;
      if (entropy) {
        [r, g, b] = report.entropy_colors[entropy[voxel]];
      } else {
        r = g = b = image[voxel];
        const label = labels && settings.overlay ? labels[voxel] : 0;
        if (label > 0) {
          const c = report.label_colors[label];
          r += (c[0] - r) * a; g += (c[1] - g) * a; b += (c[2] - b) * a;
        }
      }
      out[p] = r; out[p + 1] = g; out[p + 2] = b; out[p + 3] = 255;
    }
  }
  context.putImageData(pixels, 0, 0);
  return zoom;
}

function sliceText(view, index) {
  const v = report.views[view];
  return `slice ${index + 1} of ${v.count} (${v.slice_mm.toFixed(1)} mm apart)`;
}

function scaleBar(element, view, zoom) {
  const mmPerPixel = report.views[view].pixel_mm[0] / zoom;
  const length = [5, 10, 20, 50, 100, 200].filter((mm) => mm / mmPerPixel <= 90).pop() || 5;
  element.style.width = `${Math.round(length / mmPerPixel)}px`;
  element.textContent = `${length} mm`;
}

async function main() {
  if (typeof DecompressionStream === "undefined") {
    throw new Error("this browser cannot unpack the report's images (it needs Compression Streams: Chrome 80+, Firefox 113+, Safari 16.4+)");
  }
  const image = await inflate(report.image);
  const entropy = await inflate(report.entropy);
  const layers = [];
  for (const layer of report.layers) layers.push(await inflate(layer.labels));

  const slider = (view) => document.getElementById(`slice-${view}`);
  function drawView(view) {
    const index = Number(slider(view).value);
    const zoom = draw(document.querySelector(`canvas[data-role=overlay][data-view=${view}]`), view, index, 300, image, layers[0], null);
    draw(document.querySelector(`canvas[data-role=entropy][data-view=${view}]`), view, index, 300, image, null, entropy);
    document.getElementById(`slice-${view}-text`).textContent = sliceText(view, index);
    scaleBar(document.querySelector(`.scale[data-view=${view}]`), view, zoom);
  }
  for (const view of VIEWS) {
    const v = report.views[view];
    slider(view).max = v.count - 1;
    slider(view).value = v.start;
    slider(view).addEventListener("input", () => drawView(view));
    document.querySelectorAll(`.edge[data-view=${view}]`).forEach((e) => { e.textContent = v.edges[Number(e.dataset.edge)]; });
    document.querySelector(`.pixel[data-view=${view}]`).textContent = `pixels ${v.pixel_mm[0].toFixed(2)} × ${v.pixel_mm[1].toFixed(2)} mm`;
    drawView(view);
  }

  const gridSlider = document.getElementById("grid-slice");
  const gridView = () => document.querySelector("input[name=grid-view]:checked").value;
  function drawGrid() {
    const view = gridView(), index = Number(gridSlider.value);
    layers.forEach((labels, i) => draw(document.querySelector(`canvas[data-layer="${i}"]`), view, index, 200, image, labels, null));
    document.getElementById("grid-slice-text").textContent = `${view} ${sliceText(view, index)}`;
  }
  function chooseGridView() {
    const v = report.views[gridView()];
    gridSlider.max = v.count - 1;
    gridSlider.value = v.start;
    drawGrid();
  }
  document.querySelectorAll("input[name=grid-view]").forEach((radio) => radio.addEventListener("change", chooseGridView));
  gridSlider.addEventListener("input", drawGrid);
  chooseGridView();

  const redrawAll = () => { VIEWS.forEach(drawView); drawGrid(); };
  const opacity = document.getElementById("opacity");
  opacity.value = settings.opacity;
  opacity.addEventListener("input", () => { settings.opacity = Number(opacity.value); redrawAll(); });
  document.getElementById("show-overlay").addEventListener("change", (event) => { settings.overlay = event.target.checked; redrawAll(); });
  document.getElementById("status").remove();
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  document.getElementById("status").textContent = `The images could not be shown: ${error.message}`;
  console.error(error);
});
