/* The physics limit of an env step: replay recorded episodes with nothing but MuJoCo's own
 * calls (mj_resetData + qpos/qvel + mj_forward at episode starts; ctrl, frame_skip x mj_step,
 * mj_rnePostConstraint per env step), envs split over pthreads with no synchronisation.
 * usage: physics_limit MODEL.xml DIR NENV T NQ NV NU FRAME_SKIP NTHREAD
 * DIR holds start.bin (u8, NENV*T), qpos.bin, qvel.bin (f64, NENV*T*NQ / NV), act.bin (f64, NENV*T*NU).
 * Prints env-steps per second. */
#include <mujoco/mujoco.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static mjModel* m;
static int nenv, T, nq, nv, nu, fs, nthread;
static unsigned char* start;
static double *qpos, *qvel, *act;

static void* load(const char* dir, const char* name, size_t bytes) {
  char path[4096];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(1); }
  void* p = malloc(bytes);
  if (fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "short read %s\n", path); exit(1); }
  fclose(f);
  return p;
}

static void* worker(void* arg) {
  long t_id = (long)arg;
  int lo = (int)((long long)nenv * t_id / nthread), hi = (int)((long long)nenv * (t_id + 1) / nthread);
  mjData* d = mj_makeData(m);
  for (int e = lo; e < hi; ++e) {
    for (int t = 0; t < T; ++t) {
      size_t k = (size_t)e * T + t;
      if (start[k]) {
        mj_resetData(m, d);
        memcpy(d->qpos, qpos + k * nq, sizeof(double) * nq);
        memcpy(d->qvel, qvel + k * nv, sizeof(double) * nv);
        mj_forward(m, d);
      }
      memcpy(d->ctrl, act + k * nu, sizeof(double) * nu);
      for (int s = 0; s < fs; ++s) mj_step(m, d);
      mj_rnePostConstraint(m, d);
    }
  }
  mj_deleteData(d);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc != 10) { fprintf(stderr, "usage: %s MODEL DIR NENV T NQ NV NU FRAME_SKIP NTHREAD\n", argv[0]); return 2; }
  char err[1000];
  m = mj_loadXML(argv[1], NULL, err, sizeof(err));
  if (!m) { fprintf(stderr, "%s\n", err); return 1; }
  nenv = atoi(argv[3]); T = atoi(argv[4]); nq = atoi(argv[5]); nv = atoi(argv[6]); nu = atoi(argv[7]);
  fs = atoi(argv[8]); nthread = atoi(argv[9]);
  size_t n = (size_t)nenv * T;
  start = load(argv[2], "start.bin", n);
  qpos = load(argv[2], "qpos.bin", n * nq * sizeof(double));
  qvel = load(argv[2], "qvel.bin", n * nv * sizeof(double));
  act = load(argv[2], "act.bin", n * nu * sizeof(double));
  pthread_t th[256];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < nthread; ++i) pthread_create(&th[i], NULL, worker, (void*)i);
  for (int i = 0; i < nthread; ++i) pthread_join(th[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &b);
  double s = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
  printf("%.1f\n", n / s);
  mj_deleteModel(m);
  return 0;
}
