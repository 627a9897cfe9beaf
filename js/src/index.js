// anywidget entry point of hydra_nb's explorer (bundled to hydra_nb/widgets/static/explorer.js).
import "./style.css";
import { createExplorer } from "./explorer.js";

export default {
  render({ model, el }) {
    return createExplorer({ model, el });
  },
};
