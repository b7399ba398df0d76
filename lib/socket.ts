import { connect } from "node:net";

/** Whether a server accepts connections on the Unix socket `path` (a stale socket file answers nothing). */
export function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}
